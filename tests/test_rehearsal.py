"""The GPT-2 user's path at GPT-2-small's size (tools/rehearse.py), on the CPU: a few minutes, so it has
a marker of its own and runs with python -m pytest -m rehearsal (tools/gpu_check.py runs it on a GPU)."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from tools import gpt2


pytestmark = [pytest.mark.rehearsal, pytest.mark.slow]


def test_gpt2_small_shape_bfloat16_and_compile_through_every_stage_then_export(tmp_path):
    out = tmp_path / "rehearsal"
    proc = subprocess.run([sys.executable, "-m", "tools.rehearse", "--device=cpu", f"--out={out}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=1800, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = (out / "rehearsal.md").read_text()
    assert "| data, sft, rm, sample, align (vcb, dpo), eval |" in report and "| plan |" in report and "Peak memory" in report
    assert "plan: everything this run reads is here and readable" in proc.stdout  # the preset's paths, in the fetch layout
    assert "torch.compile: 3 graphs compiled" in proc.stdout  # log-probs, reward, value: one graph each
    model = gpt2.from_pretrained(out / "vcb-gpt2" / "model.safetensors")
    assert (model.config.n_layer, model.config.n_head, model.config.n_embd, model.config.block_size) == (12, 12, 768, 512)
    assert all(torch.isfinite(p).all() for p in model.parameters())
