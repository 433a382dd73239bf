"""Bad input gets a one-line error naming the file, line and field, and leaves no half-written file;
interrupted runs lose nothing; checkpoints from elsewhere run no code. (docs/guarantees.md)"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import data
import train
from conftest import ROOT, TINY, run, run_train, write_lines
from machinery import config, files, progress, records, runtime
from model import GPT, GPTConfig


def no_partial_files(out):
    return not [p for p in out.rglob("*") if ".tmp" in p.name]


# ---- bad input: one line naming file, line and field; nothing half-written

@pytest.mark.parametrize("line,message", [
    ('{"prompt": "a", "response": ', "sft.jsonl:3: malformed JSON"),
    ('{"prompt": "a"}', "sft.jsonl:3: missing field 'response'"),
    ('{"prompt": "a", "response": 7}', "sft.jsonl:3: field 'response' should be str, got int"),
    ('{"prompt": "  ", "response": " fine"}', "sft.jsonl:3: field 'prompt' is empty"),
    ('{"prompt": "a", "response": ""}', "sft.jsonl:3: field 'response' is empty"),
    ('["prompt", "response"]', "sft.jsonl:3: expected a JSON object, got list"),
    ("", "sft.jsonl:3: empty line"),
])
def test_bad_json_line_is_reported_with_file_line_and_field(jsonl_dir, tmp_path, line, message):
    lines = (jsonl_dir / "sft.jsonl").read_text().splitlines()
    write_lines(jsonl_dir / "sft.jsonl", lines[:2] + [line] + lines[2:])
    out = tmp_path / "out"
    with pytest.raises(files.DataError) as e:
        run(out, "--data=jsonl", f"--data_dir={jsonl_dir}", "--stage=data")
    assert message in str(e.value) and str(jsonl_dir) in str(e.value) and "\n" not in str(e.value)
    assert not (out / "data").exists() and not (out / "tokenizer.json").exists() and no_partial_files(out)


def test_empty_file_and_missing_file(jsonl_dir, tmp_path):
    (jsonl_dir / "prefs.jsonl").write_text("")
    with pytest.raises(files.DataError, match="prefs.jsonl: empty file, no records"):
        run(tmp_path / "out", "--data=jsonl", f"--data_dir={jsonl_dir}", "--stage=data")
    (jsonl_dir / "prefs.jsonl").unlink()
    with pytest.raises(files.DataError, match="prefs.jsonl: no such file"):
        run(tmp_path / "out", "--data=jsonl", f"--data_dir={jsonl_dir}", "--stage=data")


def test_prompt_longer_than_the_context_is_cut_from_the_left_and_counted(jsonl_dir, tmp_path, capsys):
    lines = (jsonl_dir / "sft.jsonl").read_text().splitlines()
    long = json.dumps({"prompt": "word " * 400, "response": " It was good."})
    write_lines(jsonl_dir / "sft.jsonl", [long] + lines)
    for stage in ("data", "sft"):
        run(tmp_path / "out", "--data=jsonl", f"--data_dir={jsonl_dir}", f"--stage={stage}", "--block_size=400")
    n = len(lines) + 1
    assert f"sft: 1 of {n} sequences were longer than block_size=400; prompts were cut from the left" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("edit,message", [
    (lambda r: {**r, "responses": r["responses"][:1], "rewards": r["rewards"][:1], "ref_logps": r["ref_logps"][:1]},
     "candidates.jsonl:2: field 'responses' has 1 candidate; VCB and the baselines need at least 2"),
    (lambda r: {**r, "rewards": [float("nan")] + r["rewards"][1:]}, "candidates.jsonl:2: field 'rewards[0]' is nan"),
    (lambda r: {**r, "rewards": r["rewards"][:-1] + [float("inf")]}, "candidates.jsonl:2: field 'rewards[2]' is inf"),
    (lambda r: {**r, "ref_logps": r["ref_logps"][:2]}, "candidates.jsonl:2: field 'ref_logps' has 2 values for 3 responses"),
    (lambda r: {**r, "rewards": ["high"] * 3}, "candidates.jsonl:2: field 'rewards[0]' should be float, got str"),
])
def test_bad_candidate_sets_are_refused(tiny_copy, edit, message):
    (tiny_copy / "stages.json").unlink()  # candidates from elsewhere: without the records, the file itself is checked
    records = files.read_jsonl(tiny_copy / "candidates.jsonl")
    records[1] = edit(records[1])
    (tiny_copy / "candidates.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))  # NaN as JSON's NaN
    before = (tiny_copy / "policy_vcb.pt").read_bytes()
    with pytest.raises(files.DataError) as e:
        run(tiny_copy, "--stage=align", "--methods=vcb", "--force")
    assert message in str(e.value)
    assert (tiny_copy / "policy_vcb.pt").read_bytes() == before and no_partial_files(tiny_copy)


@pytest.mark.slow
def test_a_prompt_whose_candidates_tie_is_skipped_and_counted(tiny_copy, capsys):
    (tiny_copy / "stages.json").unlink()  # candidates from elsewhere: without the records, the file itself is checked
    records = files.read_jsonl(tiny_copy / "candidates.jsonl")
    records[0]["rewards"] = [0.5] * 3
    files.write_jsonl(tiny_copy / "candidates.jsonl", records)
    run(tiny_copy, "--stage=align", "--methods=vcb,dpo", "--force")
    out = capsys.readouterr().out
    assert "align-vcb: 1 of 12 prompts have candidates of equal reward" in out
    assert "align-dpo: 1 of 12 prompts have candidates of equal reward" in out


def test_command_line_errors_are_one_line_without_traceback(tmp_path):
    for args, message in [(["--methods=vcb,ppo2"], "error: --methods=vcb,ppo2: unknown method 'ppo2'"),
                          (["--lr=3"], "error: unknown option --lr"),
                          (["--n_layer=two"], "error: --n_layer=two: expected int"),
                          (["--stage=rm"], "tokenizer.json: missing; run --stage=data first")]:
        proc = run_train(tmp_path / "out", *args, tiny=False)
        assert proc.returncode == 2 and message in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


# ---- inputs changed since the stage that wrote them

def flip_weight_bytes(file):
    """A few bytes of a checkpoint's weights flipped in place: torch.load still reads it, with other weights."""
    blob = bytearray(file.read_bytes())
    weights = runtime.load_checkpoint(file)["model"]["transformer.h.0.mlp.c_fc.weight"]
    at = bytes(blob).find(weights.numpy().tobytes()[:64])
    assert at > 0
    for k in range(8):
        blob[at + 16 + k] ^= 0x10
    file.write_bytes(bytes(blob))
    assert not torch.equal(runtime.load_checkpoint(file)["model"]["transformer.h.0.mlp.c_fc.weight"], weights)


@pytest.mark.parametrize("change,stage,file", [
    (lambda out: write_lines(out / "candidates.jsonl", (out / "candidates.jsonl").read_text().splitlines()[:6]),
     "align", "candidates.jsonl"),                                              # cut to half its lines
    (lambda out: flip_weight_bytes(out / "sft.pt"), "align", "sft.pt"),           # still loads, other weights
    (lambda out: shutil.copy(out / "policy_dpo.pt", out / "policy_vcb.pt"), "eval", "policy_vcb.pt"),  # one policy over another
])
def test_a_stage_run_alone_refuses_an_input_changed_since_it_was_written(tiny_copy, change, stage, file):
    change(tiny_copy)
    with pytest.raises(files.DataError) as e:
        run(tiny_copy, f"--stage={stage}", "--methods=vcb,dpo")
    assert str(e.value).startswith(f"{tiny_copy / file}: changed since the ") and "run --stage=" in str(e.value)


# ---- checkpoints and tokenizer files from elsewhere

@pytest.mark.slow
def test_missing_foreign_or_mismatched_checkpoints_and_a_corrupt_tokenizer(tiny_copy):
    (tiny_copy / "rm.pt").unlink()
    with pytest.raises(files.DataError, match="rm.pt: no such checkpoint"):
        run(tiny_copy, "--stage=sample", "--force")
    with pytest.raises(config.ConfigError, match=r"sft outputs in .* were made with n_embd=32 \(now 64\)"):
        run(tiny_copy, "--stage=rm", "--n_embd=64")
    (tiny_copy / "stages.json").unlink()  # without the records, the checkpoint itself is checked
    with pytest.raises(files.DataError, match="sft.pt: n_embd is 32 in the checkpoint but --n_embd=64 in this run"):
        run(tiny_copy, "--stage=rm", "--n_embd=64")
    data.save_tokenizer(data.byte_tokenizer(), tiny_copy / "tokenizer.json")
    with pytest.raises(files.DataError, match="sft.pt: vocab_size is 300 in the checkpoint but the tokenizer has 257"):
        run(tiny_copy, "--stage=rm")
    (tiny_copy / "tokenizer.json").write_text('{"format": "vcb-tokenizer-1", "tokens": ["AA=="')
    with pytest.raises(files.DataError, match="tokenizer.json: malformed JSON"):
        run(tiny_copy, "--stage=rm")


def test_checkpoint_whose_weights_do_not_fit_its_shape(tmp_path):
    args = dict(block_size=16, vocab_size=257, n_layer=1, n_head=2, n_embd=32, dropout=0.0, bias=True, reward_head=False)
    other = GPT(GPTConfig(**{**args, "n_embd": 16}))
    runtime.save_checkpoint(tmp_path / "sft.pt", {"model": other.state_dict(), "model_args": args,
                                                  "tokenizer": data.fingerprint(data.byte_tokenizer())})
    cfg = config.parse_args(["--device=cpu", "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=16", "--max_new_tokens=8"])
    env = runtime.setup(cfg)
    with pytest.raises(files.DataError, match="sft.pt: weights do not fit the model it describes"):
        runtime.load_model(tmp_path / "sft.pt", env, data.byte_tokenizer(), cfg)


class Payload:
    """Unpickling this would create a folder: proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_a_checkpoint_carrying_a_pickled_object_is_refused_and_runs_nothing(tmp_path):
    marker = str(tmp_path / "code-ran")
    torch.save({"model": {}, "model_args": {}, "extra": Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(files.DataError, match="evil.pt: refused: it holds pickled Python objects") as e:
        runtime.load_checkpoint(tmp_path / "evil.pt")
    assert "\n" not in str(e.value) and not os.path.exists(marker)


def test_a_truncated_checkpoint_is_a_clear_error(tmp_path):
    torch.save({"model": {"w": torch.ones(1000)}}, tmp_path / "sft.pt")
    blob = (tmp_path / "sft.pt").read_bytes()
    (tmp_path / "sft.pt").write_bytes(blob[:len(blob) // 2])
    with pytest.raises(files.DataError, match="sft.pt: not a readable checkpoint"):
        runtime.load_checkpoint(tmp_path / "sft.pt")


def test_a_resumable_checkpoint_cut_short_names_the_file_and_says_to_delete_it(tmp_path):
    torch.save({"model": {"w": torch.ones(1000)}}, tmp_path / "sft.ckpt.pt")
    blob = (tmp_path / "sft.ckpt.pt").read_bytes()
    (tmp_path / "sft.ckpt.pt").write_bytes(blob[:len(blob) // 2])
    cfg = config.parse_args([f"--out_dir={tmp_path}", "--device=cpu"])
    task = records.Task("sft", "sft", [], [str(tmp_path / "sft.pt")])
    with pytest.raises(files.DataError) as e:
        progress.Progress(cfg, runtime.setup(cfg), task, {"model": torch.nn.Linear(2, 2)}, 10)
    assert str(e.value) == (f"{tmp_path / 'sft.ckpt.pt'}: a resumable checkpoint of sft that cannot be read (cut short or "
                            f"damaged): delete it to start the task over")


# ---- interrupted runs lose nothing

def test_writes_are_atomic(tmp_path):
    def records():
        yield {"prompt": "a", "response": "b"}
        raise RuntimeError("crash while writing")

    with pytest.raises(RuntimeError):
        files.write_jsonl(tmp_path / "out.jsonl", records())
    assert not os.listdir(tmp_path)  # neither a half file nor its temporary
    files.write_jsonl(tmp_path / "out.jsonl", [{"prompt": "a", "response": "b"}])
    with pytest.raises(Exception):
        runtime.save_checkpoint(tmp_path / "out.jsonl", {"f": lambda: 0})  # cannot be saved
    assert files.read_jsonl(tmp_path / "out.jsonl") == [{"prompt": "a", "response": "b"}]  # the old file stays whole
    assert os.listdir(tmp_path) == ["out.jsonl"]


def test_a_non_finite_loss_stops_with_its_step_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = config.parse_args([f"--out_dir={tmp_path}", "--device=cpu", "--ckpt_interval=2", "--log_interval=100", "--warmup_steps=0"])
    env = runtime.setup(cfg)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, vocab_size=11, n_layer=1, n_head=1, n_embd=8))
    calls = []

    def loss_fn(m, idx):
        calls.append(len(calls)) if torch.is_grad_enabled() else None  # training steps, not the health checks
        loss = m.gpt.logits(m.gpt(torch.tensor([idx])))[..., 0].sum()
        return (loss * float("nan") if len(calls) == 4 else loss), {}

    with pytest.raises(runtime.TrainingError) as e:
        task = records.Task("sft", "sft", [], [str(tmp_path / "sft.pt")])
        train.train(cfg, env, task, model, 10, 6, 2, 1e-3, loss_fn, len, seed=0)
    assert "sft: the loss is nan at step 3" in str(e.value) and "sft.ckpt.pt (step 2), is kept" in str(e.value)
    ck = runtime.load_checkpoint(tmp_path / "sft.ckpt.pt")
    assert ck["step"] == 2 and all(torch.isfinite(v).all() for v in ck["model"].values())


@pytest.mark.slow
def test_killed_training_resumes_to_exactly_the_uninterrupted_weights(tiny_run, tmp_path):
    """SIGKILL part way through SFT, run again: the final weights equal an uninterrupted run's, bit for bit."""
    args = ["--stage=sft", "--sft_steps=150", "--ckpt_interval=10", "--n_layer=2", "--n_embd=64"]
    runs = {}
    for name in ("killed", "straight"):
        out = tmp_path / name
        shutil.copytree(tiny_run[0] / "data", out / "data")
        shutil.copy(tiny_run[0] / "tokenizer.json", out / "tokenizer.json")
        shutil.copy(tiny_run[0] / "stages.json", out / "stages.json")
        runs[name] = out
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), f"--out_dir={runs['killed']}", *TINY, *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    ckpt, deadline = runs["killed"] / "sft.ckpt.pt", time.time() + 120
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.exists() and not (runs["killed"] / "sft.pt").exists(), "the run ended before it could be killed"
    killed_at = runtime.load_checkpoint(ckpt)["step"]
    assert 0 < killed_at < 150
    resumed = run_train(runs["killed"], *args)
    assert resumed.returncode == 0 and f"resuming from {ckpt} at step" in resumed.stdout
    straight = run_train(runs["straight"], *args)
    assert straight.returncode == 0
    a = runtime.load_checkpoint(runs["killed"] / "sft.pt")["model"]
    b = runtime.load_checkpoint(runs["straight"] / "sft.pt")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    curves = [r for r in records.read_curves(runs["killed"] / "curves.jsonl") if r["task"] == "sft"]
    assert [r["step"] for r in curves] == list(range(1, 151))  # the resumed run continued its curve, no step twice
