"""Shared test settings: hermetic, seeded and quick on a 2-core CPU.

Hypothesis runs derandomised (the same examples every run, so CI is reproducible; HYPOTHESIS_PROFILE=fuzz
draws new ones, 20 times as many) and without a per-example deadline (shared CI machines are noisy; speed is measured by bench.py, not by tests).
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from hypothesis import settings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402  (after the path is set)
from machinery import config  # noqa: E402
from tasks import reviews  # noqa: E402

settings.register_profile("default", deadline=None, max_examples=60, derandomize=True)
# the longer run of the fuzz tests (test_fuzz.py, test_fuzz_options.py): 20 times the examples, new
# ones each run (a failure prints its example)
settings.register_profile("fuzz", deadline=None, max_examples=1200, derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def restore_torch_settings():
    """Global settings a test may change (runtime.setup turns TF32 on for CUDA; a test may ask for
    deterministic kernels or other threads) are put back after it, so no test runs under another's."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.get_default_dtype(),
             torch.are_deterministic_algorithms_enabled(), torch.get_num_threads())
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
    torch.set_default_dtype(saved[2])
    torch.use_deterministic_algorithms(saved[3])
    torch.set_num_threads(saved[4])


# ---- running train.py at a tiny size -----------------------------------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# the whole pipeline in seconds: a one-layer model, a few steps of each stage
TINY = ["--device=cpu", "--n_sft=200", "--n_prefs=64", "--n_align=12", "--n_eval=6", "--vocab_size=300", "--n_layer=1",
        "--n_head=2", "--n_embd=32", "--block_size=96", "--max_new_tokens=16", "--sft_steps=6", "--sft_batch=16",
        "--rm_steps=4", "--rm_batch=8", "--n_candidates=3", "--sample_batch=4", "--align_steps=3",
        "--align_batch=4", "--eval_samples=1", "--eval_batch=32", "--log_interval=2", "--ckpt_interval=2",
        "--warmup_steps=2", "--online_iters=2", "--online_prompts=4", "--online_k=2",
        "--methods=" + ",".join(config.METHODS)]  # every method, end to end


def run_train(out_dir, *args, tiny=True, env=None, timeout=300, script=("train.py",)):
    """python train.py in a subprocess (as a user runs it), one thread, returning the CompletedProcess.
    script: another program and its leading arguments, e.g. ("-m", "experiments", "sweep"). On the CPU
    unless args name a device: on a machine with a GPU the suite runs as it does without one."""
    device = [] if tiny or any(a.startswith("--device=") for a in args) else ["--device=cpu"]
    program = list(script) if script[0] == "-m" else [os.path.join(ROOT, script[0]), *script[1:]]
    cmd = [sys.executable, *program, f"--out_dir={out_dir}", *(TINY if tiny else device), *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=full_env, timeout=timeout)


# a little more than TINY: enough SFT and reward-model steps that the reward model's score is something
# a policy can learn to raise (the learning tests), still seconds on a CPU
SMALL = ["--n_sft=1500", "--n_prefs=1000", "--n_align=32", "--n_eval=6", "--vocab_size=512", "--n_layer=2", "--n_head=2",
         "--n_embd=64", "--block_size=128", "--max_new_tokens=24", "--sft_steps=150", "--sft_batch=32", "--sft_lr=3e-3",
         "--rm_steps=80", "--rm_batch=32", "--n_candidates=4", "--sample_batch=16", "--eval_samples=1", "--log_interval=50",
         "--ckpt_interval=1000", "--warmup_steps=5", "--device=cpu"]  # its reward model: ~0.65 held-out accuracy


def sharp_gpt(seed=0, **shape):
    """A small GPT with large random weights: unlike a freshly initialised one, its outputs depend
    strongly on every earlier token and position, so a wrong mask, position, column or cache entry
    changes them. shape: GPTConfig fields."""
    from model import GPT, GPTConfig
    torch.manual_seed(seed)
    m = GPT(GPTConfig(**{**dict(block_size=64, vocab_size=257, n_layer=2, n_head=2, n_embd=32), **shape})).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    return m


def run(out, *args):
    """train.main in this process, at the tiny size."""
    train.main([f"--out_dir={out}", *TINY, *args])


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))


def run_experiment(out_dir, name, *args, **kwargs):
    """python -m experiments NAME in a subprocess, like run_train."""
    return run_train(out_dir, *args, script=("-m", "experiments", name), **kwargs)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One tiny run of the whole pipeline, shared: tests copy what they need from it."""
    out = tmp_path_factory.mktemp("tiny") / "out"
    proc = run_train(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


@pytest.fixture(scope="session")
def small_run(tmp_path_factory):
    """The stages before alignment at the SMALL size, shared: the learning tests train policies on it."""
    out = tmp_path_factory.mktemp("small") / "out"
    for stage in ("data", "sft", "rm", "sample"):
        proc = run_train(out, f"--stage={stage}", *SMALL, tiny=False)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture
def jsonl_dir(tmp_path):
    """A small, valid data folder for --data=jsonl."""
    folder = tmp_path / "mydata"
    folder.mkdir()
    task = reviews.builtin_task(seed=1, n_sft=60, n_prefs=20, n_align=8, n_eval=4, n_ood=4)
    for name in ("sft", "prefs", "align_prompts", "eval_prompts"):
        write_lines(folder / f"{name}.jsonl", [json.dumps(r) for r in task[name]])
    return folder


@pytest.fixture
def tiny_copy(tiny_run, tmp_path):
    """A private copy of the tiny run's output folder."""
    out = tmp_path / "out"
    shutil.copytree(tiny_run[0], out)
    return out
