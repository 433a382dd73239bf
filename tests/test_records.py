"""What makes a stage's outputs stale is derived from the options it reads (machinery/config.py's
reading(), machinery/records.py): an option a stage reads is in its record, an option it does not
read cannot change its outputs, and the options said to change no output (config.NEUTRAL) change
none. Every check of the options comes before the first stage."""
import dataclasses
import json

import pytest
import torch

from conftest import TINY, run, run_experiment, run_train
from machinery import config, records, runtime


def settings_of(out, task):
    return json.loads((out / "stages.json").read_text())[task]["settings"]


def test_the_options_a_task_reads_are_what_its_record_keeps(tmp_path):
    cfg = config.parse_args([f"--out_dir={tmp_path}", "--device=cpu"])
    with config.reading() as reads:
        cfg.sft_lr, cfg.lam  # noqa: B018  (read, as a stage reads them)
        config.peek(cfg, "beta")  # peeked: not a dependency
        config.as_dict(cfg)  # saved whole in a checkpoint: not a dependency either
        cfg.log_interval  # noqa: B018  (NEUTRAL: changes no output)
    assert reads == {"sft_lr", "lam"}
    env = runtime.setup(cfg)
    task = records.Task("t", "sft", [], [], extra={"method": "vcb"})
    recorded = records.settings(cfg, env, task, reads)
    assert recorded == {"lam": 0.1, "sft_lr": 3e-3, "device_type": "cpu", "dtype": "float32", "method": "vcb"}
    assert records.same_settings(cfg, env, task, recorded)
    assert records.same_settings(dataclasses.replace(cfg, beta=2.0), env, task, recorded)  # not read: not stale
    assert records.differences(dataclasses.replace(cfg, lam=0.5), env, task, recorded) == ["lam=0.1 (now 0.5)"]


@pytest.mark.slow
def test_each_stage_records_what_it_read(tiny_run):
    out = tiny_run[0]
    assert {"sft_lr", "sft_steps", "block_size", "n_layer"} <= settings_of(out, "sft").keys()
    assert {"eval_batch", "n_candidates", "temperature"} <= settings_of(out, "sample").keys()  # its scores are batched by eval_batch
    assert {"lam", "beta", "align_lr", "align_steps"} <= settings_of(out, "align-vcb").keys()
    assert {"online_lr", "ppo_clip"} <= settings_of(out, "align-ppo").keys()
    assert "ppo_clip" not in settings_of(out, "align-rloo") and "online_lr" not in settings_of(out, "align-vcb")
    assert {"eval_samples", "methods"} <= settings_of(out, "eval").keys()
    for task in ("data", "sft", "rm", "sample", "align-vcb", "eval"):
        assert not config.NEUTRAL & settings_of(out, task).keys()


def altered(name, value):
    """Another valid value of an option: the test below changes every NEUTRAL option to one."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return type(value)(value * 3 + 1)
    return value


@pytest.mark.slow
def test_the_neutral_options_change_no_output(tiny_run, tmp_path):
    """The whole pipeline again in another folder with every NEUTRAL option changed (but those that
    say where and what to run): every output is the tiny run's, bit for bit. An option that does
    change results, put in NEUTRAL, fails here."""
    base = config.parse_args([f"--out_dir={tiny_run[0]}", *TINY])
    changed = [f"--{k}={altered(k, config.peek(base, k))}" for k in sorted(config.NEUTRAL - {"out_dir", "stage", "preset"})]
    assert len(changed) >= 4
    out = tmp_path / "out"
    proc = run_train(out, *changed)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("results.md", "candidates.jsonl", "data/sft.jsonl", "tokenizer.json"):
        assert (out / name).read_bytes() == (tiny_run[0] / name).read_bytes(), name
    for name in ["sft.pt", "rm.pt"] + [f"policy_{m}.pt" for m in config.METHODS]:
        a, b = (runtime.load_checkpoint(d / name)["model"] for d in (out, tiny_run[0]))
        assert all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.slow
def test_a_changed_option_redoes_what_read_it_even_when_its_results_were_kept(tiny_copy, capsys):
    """The eval stage run again with every policy's scored samples kept beside it reads them back, and
    counts the options they were made with as read: a changed --eval_samples redoes it."""
    run(tiny_copy, "--stage=eval", "--force")
    assert "eval_samples" in settings_of(tiny_copy, "eval")
    capsys.readouterr()
    run(tiny_copy, "--stage=eval", "--eval_samples=2")
    assert "eval: up to date" not in capsys.readouterr().out
    assert json.loads((tiny_copy / "results.json").read_text())["methods"]["vcb"]["eval"]["samples"] == 2 * 6


def test_torchrun_with_the_online_methods_is_refused_before_any_stage(tmp_path):
    proc = run_train(tmp_path / "out", env={"WORLD_SIZE": "2"})  # what torchrun sets; refused before it is read further
    assert proc.returncode == 2 and "which run in one process" in proc.stderr and "--methods=vcb,dpo" in proc.stderr
    assert not (tmp_path / "out").exists()
    proc = run_train(tmp_path / "out", "--sft_batch=1", "--methods=vcb", env={"WORLD_SIZE": "2"})
    assert proc.returncode == 2 and "--sft_batch=1 cannot be split into 2 processes x --grad_accum=1" in proc.stderr


def test_an_experiment_that_needs_the_gold_reward_is_refused_before_any_stage(tmp_path, jsonl_dir):
    proc = run_experiment(tmp_path / "out", "values", "--data=jsonl", f"--data_dir={jsonl_dir}")
    assert proc.returncode == 2 and "needs the built-in task's gold reward" in proc.stderr
    assert not (tmp_path / "out" / "data").exists()
