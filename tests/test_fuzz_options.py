"""Bad input by class (docs/guarantees.md), the options: every option of every command at the edges
of its type and together (classes 1 and 5), and the computation at the ends of the options' ranges
(the losses, the sampler, the preference labels, the pipeline), each read or refused in one line.

    python -m pytest tests/test_fuzz_options.py   (HYPOTHESIS_PROFILE=fuzz: 20 times the examples)
"""
import dataclasses
import json
import math
import shutil
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sample
import train
import vcb
from conftest import TINY
from experiments import report
from generators import EDGE_FLOATS, EDGE_INTS, SCALE, folder, outcome
from machinery import config, files, runtime
from model import sample_next
from tools import bench, crashtest, gpu_check, prepare, rehearse


# ---- classes 1 and 5: every option of every command at the edges of its type, and together ---------------

PARSERS = {  # every command's option parser, without running the command
    "train.py": (config.Config, config.parse_args),
    "sample.py": (sample.SampleConfig, lambda argv: config.parse_options(sample.SampleConfig(), argv, "", sample.RANGES_HERE)),
    "tools.bench": (bench.BenchConfig, bench.parse),
    "tools.gpu_check": (gpu_check.CheckConfig, lambda argv: config.parse_options(gpu_check.CheckConfig(), argv)),
    "tools.rehearse": (rehearse.RehearseConfig, lambda argv: config.parse_options(rehearse.RehearseConfig(), argv)),
    "tools.prepare": (prepare.PrepareConfig, lambda argv: config.parse_options(prepare.PrepareConfig(), argv)),
    "experiments.report": (report.SyncConfig, lambda argv: config.parse_options(report.SyncConfig(), argv)),
    "tools.crashtest": (crashtest.CrashConfig, lambda argv: config.parse_options(crashtest.CrashConfig(), argv)),
}


def test_every_number_option_of_every_command_has_a_range():
    for name, (cls, _) in PARSERS.items():
        for f in dataclasses.fields(cls):
            if type(getattr(cls, f.name)) in (int, float):
                ranges = sample.RANGES_HERE if cls is sample.SampleConfig else config.RANGES
                assert f.name in ranges, f"{name} --{f.name} has no range in config.RANGES"
                r = ranges[f.name]
                assert r.lo <= getattr(cls, f.name) <= r.hi or (r.zero and getattr(cls, f.name) == 0), (name, f.name)


def edge_value(kind):
    if kind is bool:
        return st.sampled_from(["true", "0", "yes", "maybe", "", "TRUE", "2"])
    if kind is str:
        return st.one_of(st.text(max_size=12), st.sampled_from(["", "a\x00b", "\udcff", "x" * 5000]))
    return st.one_of(EDGE_INTS.map(str), EDGE_FLOATS.map(repr), st.sampled_from(["1e999", "-inf", "nan", "1_000", "0x10",
                                                                                 "9" * 5000, "", " 3 ", "1.5", "-0"]))


@st.composite
def command_line(draw):
    name = draw(st.sampled_from(sorted(PARSERS)))
    cls = PARSERS[name][0]
    fields = [f.name for f in dataclasses.fields(cls) if f.name != "preset"]  # parsed only: no file is read
    keys = draw(st.lists(st.sampled_from(fields), min_size=1, max_size=4, unique=True))
    return name, [f"--{k}={draw(edge_value(type(getattr(cls, k))))}" for k in keys]


@settings(max_examples=300 * SCALE)
@given(command_line())
def test_any_option_at_the_edges_of_its_type_is_read_or_refused_in_one_line(line):
    name, argv = line
    cls, parse = PARSERS[name]
    opts = outcome(lambda: parse(argv))
    if isinstance(opts, Exception):
        return
    opts = opts if dataclasses.is_dataclass(opts) else cls(**opts)
    ranges = sample.RANGES_HERE if cls is sample.SampleConfig else config.RANGES
    config.check_ranges(opts, ranges)  # what was accepted is within what the computation holds
    for f in dataclasses.fields(opts):
        v = getattr(opts, f.name)
        if isinstance(v, str):
            json.dumps(v, ensure_ascii=False).encode("utf-8")  # it can be printed and saved in config.json


def test_a_bad_option_is_exit_status_2_and_one_line_from_every_command(capsys, monkeypatch):
    """Through runtime.command, as each program runs its main (report.py's too)."""
    for module, argv in [(train, ["--seed=99999999999999999999"]), (sample, ["--num_samples=0"]),
                         (bench, ["--new_tokens=-1"]), (gpu_check, ["--limit=1e9"]), (rehearse, ["--steps=0"]), (prepare, ["--timeout=0"]), (prepare, ["--mirror=ftp://x"]),
                         (report, ["--out_dir=a\x00b"]), (bench, ["--device=cuda\nx"]), (crashtest, ["--chains=0"])]:  # the message escapes the newline
        monkeypatch.setattr(sys, "argv", [module.__name__ + ".py", *argv])
        with pytest.raises(SystemExit) as e:
            runtime.command(module.main)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, (module, err)


NUMBER_OPTIONS = [f.name for f in dataclasses.fields(config.Config) if f.type in (int, float)]


@st.composite
def option_set(draw):
    """Several number options at once, each at an end of its range or inside it."""
    keys = draw(st.lists(st.sampled_from(NUMBER_OPTIONS), min_size=1, max_size=6, unique=True))
    out = []
    for k in keys:
        r = config.RANGES[k]
        kind = type(getattr(config.Config, k))
        value = draw(st.one_of(st.sampled_from([r.lo, r.hi] + ([0] if r.zero else [])),
                               st.floats(r.lo, r.hi) if kind is float else st.integers(int(r.lo), int(r.hi))))
        out.append(f"--{k}={kind(value)}")
    return out


@settings(max_examples=200 * SCALE)
@given(option_set())
def test_options_valid_alone_are_accepted_together_or_refused_in_one_line(argv):
    cfg = outcome(lambda: config.parse_args(argv))
    if isinstance(cfg, Exception):
        return
    assert cfg.max_new_tokens < cfg.block_size and cfg.n_embd % cfg.n_head == 0
    assert min(cfg.sft_batch, cfg.rm_batch, cfg.align_batch) >= cfg.grad_accum
    assert cfg.ppo_minibatches <= cfg.online_prompts


# the computation at the ends of the ranges: what the ranges promise

ENDS = lambda r: [r.lo, r.hi] + ([0.0] if r.zero else [])  # noqa: E731


@settings(max_examples=40 * SCALE)
@given(st.sampled_from(["vcb", "dpo", "ipo", "slic", "rrhf", "rebel", "infonca", "odpo"]),
       st.sampled_from(ENDS(config.RANGES["beta"])), st.sampled_from(ENDS(config.RANGES["lam"])),
       st.sampled_from([0.0, 1e-3, config.RANGES["sigma_floor"].hi]), st.integers(0, 2**31))
def test_every_loss_is_finite_with_its_gradient_at_the_ends_of_the_option_ranges(method, beta, lam, sigma_floor, seed):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(3, 4, generator=g) * torch.tensor([[1e-6], [1.0], [1e3]])  # spreads from tiny to large
    ref = -torch.rand(3, 4, generator=g) * 50
    logps = (ref + torch.randn(3, 4, generator=g) * 3).requires_grad_(True)
    m = vcb.METHODS[method]
    spread = vcb.reward_sigma(rewards.flatten()[None])
    loss = m.loss(logps, ref, rewards, beta, lam, spread if m.sigma == "set" else None, sigma_floor)
    loss.backward()
    assert loss.isfinite() and logps.grad.isfinite().all(), (method, beta, lam, sigma_floor, loss)


@given(st.sampled_from(ENDS(config.RANGES["temperature"])), st.sampled_from([None, 1, 5, 10**9]),
       st.sampled_from(ENDS(config.RANGES["top_p"])), st.floats(-1e4, 1e4), st.integers(0, 2**31))
def test_sampling_draws_a_real_token_at_the_ends_of_temperature_top_k_and_top_p(temperature, top_k, top_p, scale, seed):
    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(seed)) * scale
    token = sample_next(logits, temperature, top_k, top_p, generator=torch.Generator().manual_seed(seed))
    assert token.shape[0] == 2 and ((0 <= token) & (token < 50)).all()


@given(st.sampled_from(ENDS(config.RANGES["pref_tau"])), st.floats(-1, 1), st.floats(-1, 1))
def test_preference_labels_at_the_ends_of_pref_tau(pref_tau, ga, gb):
    """Found by the generator: exp((gb - ga) / pref_tau) overflowed for a small pref_tau."""
    from tasks import reviews
    task = outcome(lambda: reviews.builtin_task(seed=0, n_sft=1, n_prefs=5, n_align=1, n_eval=1, n_ood=1, pref_tau=pref_tau))
    assert not isinstance(task, Exception) and len(task["prefs"]) == 5


def test_more_prompts_than_the_built_in_task_has_is_one_line_not_a_hang():
    from tasks import reviews
    e = outcome(lambda: reviews.builtin_task(seed=0, n_sft=1, n_prefs=1, n_align=10**6, n_eval=1, n_ood=1))
    assert isinstance(e, files.DataError) and "distinct prompts" in str(e)


# the pipeline with options valid alone, together: from the sample stage on, on a copy of the tiny run

PIPELINE_OPTIONS = {  # what the stages after the reward model read, with values at or near the ends that run in seconds
    "n_candidates": [2, 3, 5], "top_k": [0, 1, 10**9], "top_p": [1e-6, 0.5, 1.0], "temperature": [1e-6, 1.0, 1e3],
    "sample_batch": [1, 4, 10**6], "align_batch": [1, 4, 64], "grad_accum": [1, 2], "align_steps": [1, 3],
    "beta": [1e-6, 1.0, 1e6], "lam": [0.0, 1e-6, 1e6], "sigma_floor": [0.0, 1e6], "eval_samples": [1, 2],
    "eval_batch": [1, 5, 10**6], "online_prompts": [1, 2, 64], "online_k": [2, 3], "ppo_minibatches": [1, 2],
    "ppo_target_kl": [0.0, 1e-6], "ppo_gamma": [0.0, 1.0], "ppo_lambda": [0.0, 1.0],
    "max_new_tokens": [1, 16], "log_interval": [1, COUNT := config.COUNT], "ckpt_interval": [1, COUNT],
}


@pytest.mark.slow
@settings(max_examples=10 * SCALE, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(sorted(PIPELINE_OPTIONS)), st.integers(0, 2), min_size=3, max_size=8),
       st.sampled_from(["vcb,dpo,rebel", "infonca,odpo,rrhf", "ppo,rloo,ipo", "slic,vcb"]))
def test_the_pipeline_runs_with_options_at_their_ends_or_refuses_them_in_one_line(tiny_run, choice, methods):
    argv = [f"--{k}={PIPELINE_OPTIONS[k][i % len(PIPELINE_OPTIONS[k])]}" for k, i in choice.items()]
    with folder() as d:
        out = d / "out"
        shutil.copytree(tiny_run[0], out, ignore=shutil.ignore_patterns("policy_*", "candidates.jsonl", "results.*"))
        result = outcome(lambda: train.main([f"--out_dir={out}", *TINY, "--stage=sample", f"--methods={methods}", *argv]) or
                         train.main([f"--out_dir={out}", *TINY, "--stage=align", f"--methods={methods}", *argv]) or
                         train.main([f"--out_dir={out}", *TINY, "--stage=eval", f"--methods={methods}", *argv]))
        assert not list(out.rglob("*.tmp*"))  # nothing half-written, whatever happened
        if not isinstance(result, Exception):
            results = json.loads((out / "results.json").read_text())
            for m in methods.split(","):
                r = results["methods"][m]["eval"]
                assert all(v is None or math.isfinite(v) for v in r.values() if isinstance(v, float)), (m, r)
                assert -1 <= r["gold_reward"] <= 1
