"""tools/bench.py runs and reports each measurement (speed targets are read from its output, not
asserted), and tools/gpu_check.py runs every one of its steps at a tiny size on a CPU and writes its report."""
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from tools import bench


def test_bench_runs_every_measurement_on_a_tiny_preset(capsys):
    bench.main(["--preset=tiny", "--device=cpu", "--new_tokens=8", "--n_candidates=4"])
    out = capsys.readouterr().out
    for text in ("matmul peak (measured", "train:", "MFU", "KV cache", "same tokens", "attention at the built-in task's lengths",
                 "attention at the GPT-2 HH preset's lengths", "x fewer", "align (VCB) step", "with the packed layout",
                 "with the padded rows", "faster here: --layout=", "an SFT step", "| sft |", "| eval |"):
        assert text in out


def test_datasheet_peaks_are_read_from_the_device_name():
    assert bench.datasheet_peak("NVIDIA H100 80GB HBM3") == 989e12 and bench.datasheet_peak("NVIDIA H100 PCIe") == 756e12
    assert bench.datasheet_peak("NVIDIA L40S") == 362e12 and bench.datasheet_peak("NVIDIA L4") == 121e12
    assert bench.datasheet_peak("Some Future GPU") is None


@pytest.mark.slow
def test_gpu_check_runs_every_step_at_a_tiny_size_and_writes_one_report(tmp_path):
    # the compiled pipeline takes about 110 s on a free 2-core CPU: the limits leave room for a busy one
    proc = subprocess.run([sys.executable, "-m", "tools.gpu_check", "--tiny", "--device=cpu", f"--out={tmp_path / 'check'}", "--limit=900"],
                          cwd=ROOT, capture_output=True, text=True, timeout=2400, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    report = (tmp_path / "check" / "gpu_check.md").read_text()
    for text in ("# gpu_check on", "| device tests | ", " passed", "| bench |", "| pipeline, default settings, --compile=true |",
                 "| pipeline, GPT-2-small shape |", "matmul peak", "stage times: data", "torch.compile: ", "| vcb |"):
        assert text in report, text


def test_gpu_check_counts_a_run_where_every_test_skipped_as_a_failure():
    from tools import gpu_check
    assert gpu_check.passed("..........\n7 passed, 12 deselected in 4.80s\n") == 7
    assert gpu_check.passed("sssss\n5 skipped in 0.10s\n") == 0 and gpu_check.passed("") == 0


def test_gpu_check_says_what_to_do_without_a_gpu():
    if __import__("torch").cuda.is_available():
        pytest.skip("there is a GPU here")
    proc = subprocess.run([sys.executable, "-m", "tools.gpu_check"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "PyTorch sees no CUDA GPU" in proc.stderr and "--tiny" in proc.stderr
