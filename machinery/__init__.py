"""The run machinery: options (config.py), devices, DDP, checkpoints and one-line errors (runtime.py),
the training loop's bookkeeping (progress.py), the stage records (records.py), every file read or
written and the file system's refusals (files.py), and the run's processes: one run per folder,
workers that die with their parent (processes.py). The machine learning is in the files at the top;
they call in here."""
