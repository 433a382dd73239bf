"""The run machinery: options (config.py), devices, DDP, checkpoints and one-line errors (runtime.py),
the training loop's bookkeeping (progress.py), the stage records (records.py), and every file read or
written (files.py). The machine learning is in the files at the top; they call in here."""
