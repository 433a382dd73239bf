"""Shared test settings: hermetic, seeded and quick on a 2-core CPU.

Hypothesis runs derandomised (the same examples every run, so CI is reproducible) and without a
per-example deadline (shared CI machines are noisy; speed is measured by bench.py, not by tests).
"""
import os
import sys

import torch
from hypothesis import settings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

settings.register_profile("default", deadline=None, max_examples=60, derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
torch.set_num_threads(min(2, torch.get_num_threads()))
