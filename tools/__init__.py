"""Tools around the pipeline: fetching GPT-2 and the paper's data sets (prepare.py, the only network
use), the plan of a run (plan.py, train.py --plan), speed and estimates (bench.py), a one-command GPU
check (gpu_check.py), the GPT-2 user's path rehearsed (rehearse.py), GPT-2 weights in and out
(gpt2.py), the crash-consistency harness (crashtest.py, with the faults it strikes in faults.py)."""
