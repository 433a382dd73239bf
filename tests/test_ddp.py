"""Several processes through torchrun (PyTorch DDP, gloo on CPU): the same parameters as one process
on the same global batch, and the same candidates file whatever the number of processes."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, TINY, run_train
from machinery import runtime


pytestmark = pytest.mark.slow


def torchrun(out_dir, nproc, *args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           os.path.join(ROOT, "train.py"), f"--out_dir={out_dir}", *TINY, *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def prepared(tiny_run, folder, upto):
    """A copy of the tiny run holding the outputs of the stages before `upto` only."""
    shutil.copytree(tiny_run[0], folder)
    keep = {"sft": ["data", "tokenizer.json", "stages.json"],
            "sample": ["data", "tokenizer.json", "stages.json", "sft.pt", "rm.pt"]}[upto]
    for p in folder.iterdir():
        if p.name not in keep:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    return folder


@pytest.mark.parametrize("accum", [1, 2])
def test_two_processes_train_the_same_parameters_as_one(tiny_run, tmp_path, accum):
    """2 processes x accum micro-batches against 1 process x 2*accum micro-batches: the same items,
    so the same gradients up to the order of float additions."""
    args = ["--stage=sft", "--sft_steps=5", "--sft_batch=8"]
    one, two = prepared(tiny_run, tmp_path / "one", "sft"), prepared(tiny_run, tmp_path / "two", "sft")
    single = run_train(one, *args, f"--grad_accum={2 * accum}")
    assert single.returncode == 0, single.stderr[-2000:]
    multi = torchrun(two, 2, *args, f"--grad_accum={accum}")
    assert multi.returncode == 0, multi.stderr[-3000:]
    assert "processes: 2" in multi.stdout
    a = runtime.load_checkpoint(one / "sft.pt")["model"]
    b = runtime.load_checkpoint(two / "sft.pt")["model"]
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


def test_sharded_sampling_writes_the_same_candidates_as_one_process(tiny_run, tmp_path):
    one, two = prepared(tiny_run, tmp_path / "one", "sample"), prepared(tiny_run, tmp_path / "two", "sample")
    single = run_train(one, "--stage=sample")
    multi = torchrun(two, 2, "--stage=sample")
    assert single.returncode == 0 and multi.returncode == 0, multi.stderr[-3000:]
    assert (one / "candidates.jsonl").read_bytes() == (two / "candidates.jsonl").read_bytes()
    assert (one / "candidates.jsonl").read_bytes() == (tiny_run[0] / "candidates.jsonl").read_bytes()


def test_two_processes_align_and_evaluate_like_one(tiny_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(tiny_run[0], out)
    proc = torchrun(out, 2, "--stage=eval", "--force")  # the same policies, evaluated by 2 processes
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = json.loads((tiny_run[0] / "results.json").read_text())["methods"]
    assert json.loads((out / "results.json").read_text())["methods"] == one
    proc = torchrun(out, 2, "--stage=align", "--methods=vcb,rrhf", "--force")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for m in ("vcb", "rrhf"):
        a = runtime.load_checkpoint(out / f"policy_{m}.pt")["model"]
        b = runtime.load_checkpoint(tiny_run[0] / f"policy_{m}.pt")["model"]
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
