"""sample.py (what the policies write) and the training curves (curves.jsonl, curves.png)."""
import json
import math
import os
import subprocess
import sys

import data
import vcb
from conftest import ROOT
from machinery import config, records


def sample(out, *args, stdin=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), f"--out_dir={out}", "--device=cpu", *args], input=stdin,
                          capture_output=True, text=True, cwd=ROOT, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_every_policy_samples_side_by_side_with_its_scores(tiny_run):
    proc = sample(tiny_run[0], "--prompt=I saw Night Train with my family.", "--num_samples=2", "--seed=3")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "prompt: 'I saw Night Train with my family.'" in lines[1] and "RM" in lines[2] and "logp_sft" in lines[2]
    rows = lines[3:]
    assert [r.split()[0] for r in rows] == [m for m in ["sft"] + config.METHODS for _ in range(2)]
    for row in rows:  # name, RM reward, gold reward, log-prob under SFT, then the text
        name, rm, gold, logp = row.split()[:4]
        assert -1 <= float(gold) <= 1 and float(logp) < 0 and math.isfinite(float(rm))
    again = sample(tiny_run[0], "--prompt=I saw Night Train with my family.", "--num_samples=2", "--seed=3")
    assert again.stdout == proc.stdout  # the seed gives the same samples


def test_prompts_from_a_file_or_typed(tiny_run, tmp_path):
    (tmp_path / "prompts.txt").write_text("I watched Cold River last night.\n\nWe tried Casa Verde on Saturday.\n")
    proc = sample(tiny_run[0], f"--prompt_file={tmp_path / 'prompts.txt'}", "--methods=sft,vcb", "--num_samples=1")
    assert proc.returncode == 0 and proc.stdout.count("prompt: ") == 2
    typed = sample(tiny_run[0], "--methods=vcb", "--num_samples=1", "--temperature=0", stdin="I saw Echo Park.\n\n")
    assert typed.returncode == 0 and "prompt: 'I saw Echo Park.'" in typed.stdout


def test_clear_one_line_errors(tiny_copy, tmp_path):
    for args, message in [([f"--out_dir={tmp_path / 'none'}"], "no such folder"),
                          (["--methods=sft,ppo2"], "--methods: unknown policy 'ppo2'"),
                          (["--top_p=0"], "--top_p=0.0: must be a number from 1e-06 to 1"),
                          (["--temperature=nan"], "--temperature=nan: must be 0 (greedy) or a number from 1e-06")]:
        proc = sample(tiny_copy, "--prompt=x", *args)
        assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    (tiny_copy / "policy_vcb.pt").unlink()
    proc = sample(tiny_copy, "--prompt=x", "--methods=vcb")
    assert proc.returncode == 2 and "policy_vcb.pt: no such checkpoint" in proc.stderr
    data.save_tokenizer(data.byte_tokenizer(), tiny_copy / "tokenizer.json")
    proc = sample(tiny_copy, "--prompt=x")
    assert proc.returncode == 2 and "vocab_size is 300 in the checkpoint but the tokenizer has 257" in proc.stderr


def test_every_training_task_logs_each_step_once_and_the_figure_is_drawn(tiny_run):
    curves = records.read_curves(tiny_run[0] / "curves.jsonl")
    steps = {}
    for r in curves:
        steps.setdefault(r["task"], []).append(r["step"])
    assert steps == {"sft": list(range(1, 7)), "rm": list(range(1, 5)), "align-ppo": [1, 2], "align-rloo": [1, 2],
                     **{f"align-{m}": [1, 2, 3] for m in config.METHODS if not vcb.METHODS[m].online}}
    first = [r for r in curves if r["task"] == "align-vcb"][0]
    assert {"loss", "lr", "margin", "acc", "gap_corr", "skipped"} <= first.keys()
    assert {"acc"} <= [r for r in curves if r["task"] == "rm"][0].keys()
    assert (tiny_run[0] / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_a_resumed_task_continues_its_curve_and_a_fresh_one_restarts_it(tmp_path):
    file = tmp_path / "curves.jsonl"
    lines = [{"task": "sft", "step": s, "loss": 1.0 / s} for s in range(1, 6)] + [{"task": "rm", "step": 1, "loss": 0.7}]
    file.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"task": "sft", "st')  # a line torn by a crash
    records.curves_from(file, "sft", 3)  # resumed at step 3: steps 4 and 5 will be logged again
    assert [(r["task"], r["step"]) for r in records.read_curves(file)] == [("sft", 1), ("sft", 2), ("sft", 3), ("rm", 1)]
    records.curves_from(file, "rm", 0)  # run afresh
    assert [r["task"] for r in records.read_curves(file)] == ["sft"] * 3
    records.curves_append(file, {"task": "rm", "step": 1, "loss": float("nan")})
    assert records.read_curves(file)[-1] == {"task": "rm", "step": 1, "loss": None}
