"""train.py: options, batch order, learning-rate schedule, and the whole pipeline at a tiny size."""
import json
import math

import pytest
import torch

import data
from conftest import run_train
from machinery import config, files, runtime


# ---- options

def test_options_are_converted_to_their_field_types():
    cfg = config.parse_args(["--dropout=0", "--n_layer=2", "--force", "--compile=false", "--methods=vcb,dpo", "--beta=0.5"])
    assert cfg.dropout == 0.0 and isinstance(cfg.dropout, float) and cfg.n_layer == 2
    assert cfg.force is True and cfg.compile is False and config.method_list(cfg) == ["vcb", "dpo"]


@pytest.mark.parametrize("argv,message", [
    (["--n_layr=2"], "unknown option --n_layr; did you mean --n_layer?"),
    (["--zzz=1"], "unknown option --zzz"),
    (["--n_layer=2.5"], "--n_layer=2.5: expected int"),
    (["--beta=high"], "--beta=high: expected float"),
    (["--force=maybe"], "--force=maybe: expected bool"),
    (["--methods=vcb,ppo2"], "unknown method 'ppo2'"),
    (["--stage=train"], "--stage=train: expected one of"),
    (["n_layer=2"], "options look like --key=value"),
    (["--n_layer"], "--n_layer needs a value"),
    (["--n_embd=100", "--n_head=3"], "must be a multiple"),
    (["--data=hh"], "needs --data_dir"),
    (["--align_lr=nan"], "--align_lr=nan: must be a number from 1e-12 to 1e+30"),
    (["--beta=inf"], "--beta=inf: must be a number from 1e-06 to 1e+06"),
    (["--grad_clip=nan"], "--grad_clip=nan: must be 0 (off) or a number from 1e-06 to 1e+06"),
    (["--pref_tau=nan"], "--pref_tau=nan: must be a number from 1e-06"),
    (["--temperature=nan"], "--temperature=nan: must be a number from 1e-06"),
    (["--sweep_lrs=-1"], "--sweep_lrs=-1: -1.0 is not from 0.001 to 1000"),
    (["--sweep_kls=1,nan"], "nan is not from 0.001 to 10000"),
    (["--sweep_lrs=1,1.0"], "--sweep_lrs=1,1.0: 1 appears twice"),
    (["--methods=vcb,dpo,vcb"], "vcb is named twice"),
    (["--sweep_seeds=0,1.5"], "--sweep_seeds=0,1.5: expected comma-separated whole numbers"),
    (["--device=mps"], "--device=mps: expected auto, cpu, cuda or cuda:N"),
    (["--device=foo"], "--device=foo: expected auto, cpu, cuda or cuda:N"),
    (["--n_candidates=1"], "--n_candidates=1: must be a number from 2 to 1024 (VCB and the baselines compare candidates)"),
    (["--data_dir=X"], "--data_dir=X is read only with --data=hh, tldr or jsonl"),
    (["--grad_accum=4", "--align_batch=2"], "--align_batch=2 cannot be split into --grad_accum=4 micro-batches"),
    (["--methods=,"], "--methods=,: no method"),
    (["--ppo_lambda=-0.5"], "--ppo_lambda=-0.5: must be a number from 0 to 1"),
    (["--n_layer=0"], "--n_layer=0: must be a number from 1 to 1024"),
])
def test_bad_options_are_one_line_errors(argv, message):
    with pytest.raises(config.ConfigError) as e:
        config.parse_args(argv)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_help_lists_every_option_with_its_comment():
    text = config.usage()
    for f in config.dataclasses.fields(config.Config):
        assert f"--{f.name}=" in text
    assert "LogSumExp temperature" in text


# ---- batches and schedule

def test_batch_indices_are_epoch_permutations_and_a_function_of_seed_and_step():
    n, b = 10, 4
    seen = [i for step in range(5) for i in runtime.batch_indices(n, b, step, seed=3)]
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))
    assert runtime.batch_indices(n, b, 2, seed=3) == seen[8:12]  # no state: resumable anywhere
    assert runtime.batch_indices(n, b, 0, seed=4) != runtime.batch_indices(n, b, 0, seed=3)


def test_learning_rate_warms_up_then_decays_to_a_tenth():
    lrs = [runtime.lr_at(s, 100, 1.0, 10) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert runtime.lr_at(100, 100, 1.0, 10) == pytest.approx(0.1)


# ---- the pipeline, end to end

@pytest.mark.slow
def test_pipeline_writes_every_file_and_skips_done_work(tiny_run):
    out, proc = tiny_run
    for name in data.TASK_FILES:
        assert files.read_jsonl(out / "data" / f"{name}.jsonl", data.SCHEMAS[name])
    assert data.load_tokenizer(out / "tokenizer.json").n_vocab == 300
    cands = files.read_jsonl(out / "candidates.jsonl", data.SCHEMAS["candidates"])
    assert len(cands) == 12 and all(len(r["responses"]) == len(r["rewards"]) == 3 for r in cands)
    for name in ["sft", "rm"] + [f"policy_{m}" for m in config.METHODS]:
        ck = runtime.load_checkpoint(out / f"{name}.pt")
        assert ck["model_args"]["n_layer"] == 1 and ck["config"]["n_embd"] == 32
        assert all(torch.isfinite(v).all() for v in ck["model"].values())
    assert not list(out.glob("*.ckpt.pt")) and not list(out.rglob("*.tmp*"))
    assert (out / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((out / "results.json").read_text())
    assert results["judge"] == "gold" and 0 <= results["reward_model"]["heldout_accuracy"] <= 1
    for method in ["sft"] + config.METHODS:
        for split in ("eval", "ood"):
            r = results["methods"][method][split]
            for key in ("gold_reward", "rm_reward", "kl", "win_rate_vs_sft", "win_rate_vs_dpo", "distinct_2"):
                assert math.isfinite(r[key]), (method, split, key)
            assert 0 <= r["win_rate_vs_sft"] <= 1 and -1 <= r["gold_reward"] <= 1
    assert results["methods"]["sft"]["eval"]["kl"] == 0.0 and results["methods"]["sft"]["eval"]["win_rate_vs_sft"] == 0.5
    assert "| vcb |" in (out / "results.md").read_text() and "| vcb |" in proc.stdout
    assert "align-vcb step 3/3: loss" in proc.stdout and "gap_corr" in proc.stdout  # what a user watches


@pytest.mark.slow
def test_second_run_is_up_to_date_and_a_changed_setting_redoes_what_depends_on_it(tiny_copy):
    again = run_train(tiny_copy)
    assert again.returncode == 0, again.stderr[-2000:]
    for stage in ("data", "sft", "rm", "sample", "align-vcb", "align-dpo", "eval"):
        assert f"{stage}: up to date" in again.stdout
    before = (tiny_copy / "candidates.jsonl").read_bytes()
    changed = run_train(tiny_copy, "--beta=0.5", "--methods=vcb,dpo", "--stage=align")
    assert changed.returncode == 0, changed.stderr[-2000:]
    assert "align-vcb step 3/3" in changed.stdout and "sample:" not in changed.stdout
    assert (tiny_copy / "candidates.jsonl").read_bytes() == before
    forced = run_train(tiny_copy, "--stage=sft", "--force")
    assert forced.returncode == 0 and "sft step 6/6" in forced.stdout


# ---- presets: a file of options

def test_a_preset_file_sets_options_and_the_command_line_overrides_it(tmp_path):
    cfg = config.parse_args(["--block_size=256", "--preset=presets/gpt2-hh.json"])  # wherever --preset stands
    assert cfg.data == "hh" and cfg.tokenizer == "gpt2" and cfg.max_new_tokens == 128 and cfg.sft_lr == 1e-5
    assert cfg.block_size == 256 and cfg.preset == "presets/gpt2-hh.json"
    assert config.parse_args(["--preset=presets/gpt2-tldr.json"]).block_size == 640


@pytest.mark.parametrize("text,message", [
    ('{"block_sise": 512}', "unknown option 'block_sise'; did you mean 'block_size'?"),
    ('{"block_size": "big"}', "option 'block_size' is big: expected int"),
    ('{"block_size": [512]}', "option 'block_size' is [512], expected int"),
    ('{"compile": 1}', "option 'compile' is 1, expected bool"),
    ('[1, 2]', "expected a JSON object, got list"),
    ('{"block_size": 5', "malformed JSON"),
    ('[' * 100_000, "JSON nested too deeply to read"),
    ('{"block_size": 1e999}', "option 'block_size' is inf: expected int"),
    ('{"lam": 1e999}', "--lam=inf: must be 0 (a plain mean) or a number from 1e-06"),
])
def test_a_bad_preset_is_a_one_line_error_naming_the_file_and_option(tmp_path, text, message):
    (tmp_path / "p.json").write_text(text)
    with pytest.raises(config.ConfigError) as e:
        config.parse_args([f"--preset={tmp_path / 'p.json'}"])
    assert message in str(e.value) and "p.json" in str(e.value) and "\n" not in str(e.value)
