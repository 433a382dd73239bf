"""Tools around the pipeline: speed (bench.py), a one-command GPU check (gpu_check.py), the GPT-2
user's path rehearsed (rehearse.py), GPT-2 weights in and out (gpt2.py), the crash-consistency
harness (crashtest.py, with the faults it strikes in faults.py)."""
