"""
tools/gpu_check.py: see that everything works on one GPU, and how fast, with one command (sized for 5 to
8 minutes on an H100-class GPU, each step stopped after --limit seconds); what it measured goes into
one markdown file, ready for docs/gpu.md.

    python -m tools.gpu_check                      # on a machine with a CUDA GPU -> gpu_check/gpu_check.md
    python -m tools.gpu_check --tiny --out=check   # the same steps at a tiny size, on a CPU (the tests run it)

The steps, each a command of the project run as a user runs it, each with a time limit:
  1. the device tests:           python -m pytest -m cuda tests/test_cuda.py   (a run where every
                                 test is skipped is a failure: nothing was checked)
  2. the speed measurements:     python -m tools.bench --preset=gpt2   (GPT-2-small's shape, bfloat16)
  3. the whole pipeline on the built-in task at the default settings with --compile=true: its stage
     times, peak memory and how many graphs torch.compile made
  4. the GPT-2 user's path:      python -m tools.rehearse   (GPT-2-small's shape, HH-format data, bfloat16,
                                 --compile=true, every stage, then the export of the policy)
With --tiny, every step at a tiny size on whatever device there is (a CPU in the tests): the device
tests that run on a CPU, and the pipeline's GPT-2-shaped rehearsal replaced by the tiny pipeline.
It needs the network for nothing. Beyond PyTorch it needs the packages of requirements.txt (all of
them pure Python or with wheels for Linux x86-64), which an offline GPU machine can take as wheels.
"""
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

from machinery.config import ConfigError, parse_options
from machinery.files import make_folder, write_text
from machinery.runtime import command


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository

# the pipeline at GPT-2-small's shape, a few steps of every stage (a BPE vocabulary of the task's size)
GPT2_SHAPE = ["--n_layer=12", "--n_head=12", "--n_embd=768", "--block_size=256", "--max_new_tokens=64", "--vocab_size=8192",
              "--sft_steps=40", "--sft_lr=3e-4", "--rm_steps=20", "--rm_lr=1e-4", "--n_align=128", "--align_steps=20",
              "--align_lr=1e-5", "--online_iters=3", "--online_lr=1e-5", "--critic_lr=1e-5", "--n_eval=64",
              "--log_interval=10", "--ckpt_interval=1000"]
TINY = ["--n_sft=200", "--n_prefs=64", "--n_align=8", "--n_eval=4", "--vocab_size=300", "--n_layer=1", "--n_head=2",
        "--n_embd=32", "--block_size=96", "--max_new_tokens=16", "--sft_steps=4", "--sft_batch=16", "--rm_steps=3",
        "--rm_batch=8", "--n_candidates=3", "--sample_batch=4", "--align_steps=2", "--align_batch=4", "--eval_samples=1",
        "--eval_batch=32", "--online_iters=2", "--online_prompts=4", "--online_k=2", "--log_interval=1"]


@dataclass
class CheckConfig:
    out: str = "gpu_check"           # folder for the runs and gpu_check.md
    tiny: bool = False               # every step at a tiny size (the tests run it on a CPU)
    device: str = "auto"             # auto, cpu, cuda, cuda:N: where every step runs
    limit: int = 300                 # seconds each step may take before it is stopped


def run(name, cmd, limit, log):
    """Run one step, print its output as it comes, and return (seconds, return code, output)."""
    print(f"\n==> {name}: {' '.join(cmd)}", flush=True)
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=limit,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
        out, rc = proc.stdout + proc.stderr[-4000:], proc.returncode
    except subprocess.TimeoutExpired as e:
        out, rc = (e.stdout or b"").decode(errors="replace") + f"\n(stopped after {limit} s)", "timeout"
    seconds = time.time() - t0
    print(out[-3000:], flush=True)
    log.append((name, seconds, rc))
    return seconds, rc, out


def lines_with(text, *starts):
    return "\n".join(line for line in text.splitlines() if line.startswith(starts))


def passed(pytest_output):
    """How many tests pytest says passed (0 when every one was skipped)."""
    m = re.search(r"(\d+) passed", pytest_output.strip().splitlines()[-1] if pytest_output.strip() else "")
    return int(m[1]) if m else 0


def main(argv):
    opts = parse_options(CheckConfig(), argv, __doc__)
    cuda = opts.device != "cpu" and torch.cuda.is_available()
    if not opts.tiny and not cuda:
        raise ConfigError("PyTorch sees no CUDA GPU: run on a machine with one, or --tiny to check the script on a CPU")
    make_folder(opts.out)
    py, log, size, device = sys.executable, [], TINY if opts.tiny else [], [f"--device={opts.device}"]
    name = torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()})"
    marks = ["-m", "cuda"] if cuda else ["-m", "not cuda and not slow"]
    _, rc, tests = run("device tests", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", *marks, "tests/test_cuda.py"],
                       opts.limit, log)
    if rc == 0 and passed(tests) == 0:  # every test skipped: nothing was checked, which is no pass
        log[-1] = ("device tests", log[-1][1], "no test ran")
    _, _, bench = run("bench", [py, "-m", "tools.bench", "--preset=" + ("tiny" if opts.tiny else "gpt2"), *device], opts.limit, log)
    _, _, default = run("pipeline, default settings, --compile=true",
                        [py, "train.py", f"--out_dir={opts.out}/default", "--compile=true", *device, *size], opts.limit, log)
    if opts.tiny:
        _, _, shaped = run("pipeline, GPT-2-small shape", [py, "train.py", f"--out_dir={opts.out}/gpt2-shape", *GPT2_SHAPE,
                                                           *device, *size], opts.limit, log)
    else:
        _, _, shaped = run("the GPT-2 user's path (tools.rehearse)", [py, "-m", "tools.rehearse", f"--out={opts.out}/rehearsal", *device],
                           2 * opts.limit, log)
    report = [f"# gpu_check on {name}", "",
              f"PyTorch {torch.__version__}, CUDA {torch.version.cuda}, Python {platform.python_version()}"
              + (" (--tiny: every step at a tiny size)" if opts.tiny else ""), "",
              "| step | seconds | exit status |", "|---|---|---|", *[f"| {n} | {s:.0f} | {rc} |" for n, s, rc in log], "",
              "## Device tests", "", "```", tests.strip().splitlines()[-1] if tests.strip() else "", "```", "",
              "## tools.bench", "", "```", lines_with(bench, "device:", "matmul", "train:", "sample", "attention", "align"), "```", "",
              "## The pipeline at the default settings, --compile=true", "", "```",
              lines_with(default, "stage times", "torch.compile", "| "), "```", "",
              "## The GPT-2-small shape" + ("" if opts.tiny else ": tools.rehearse"), "", "```",
              lines_with(shaped, "sft:", "stage times", "torch.compile", "estimated (not measured)", "| ", "Peak"), "```", ""]
    write_text(os.path.join(opts.out, "gpu_check.md"), "\n".join(report))  # whole, or not at all
    print(f"\nwrote {os.path.join(opts.out, 'gpu_check.md')}")
    failed = [n for n, _, rc in log if rc != 0]
    if failed:
        raise ConfigError(f"these steps failed: {', '.join(failed)} (their output is above and in gpu_check.md)")


if __name__ == "__main__":
    command(main)
