"""The experiments that drive the pipeline many times (python -m experiments NAME): the harness that
trains and scores grids of policies (harness.py), the ablations, the values experiment, and the
tables and figures (report.py)."""
