"""Inputs that broke the guarantees (docs/guarantees.md) once, and what a new user tries on day one: each gets a
one-line error with exit status 2, or a documented, counted handling; never a traceback, a hang, a
NaN in the results, or a later stage crashing on what an earlier stage accepted."""
import gzip
import json
import math
import os
import re
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
from machinery import config, files, records, runtime
from model import GPT, GPTConfig
from tasks import corpora, reviews
from test_real_data import HH, write_hh, write_tldr


def stages_json(out):
    return json.loads((out / "stages.json").read_text())


# ---- 1. a stage that fails part-way leaves nothing that looks finished

def test_a_data_stage_that_fails_drops_its_record_and_changes_no_file(tiny_copy, monkeypatch):
    before = {p.name: p.read_bytes() for p in (tiny_copy / "data").iterdir()}
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tiny_copy / "no-cache"))
    with pytest.raises(files.DataError, match="vocab.bpe and encoder.json are missing"):
        run(tiny_copy, "--stage=data", "--tokenizer=gpt2", f"--tokenizer_dir={tiny_copy / 'no-gpt2'}")
    assert "data" not in stages_json(tiny_copy)
    assert {p.name: p.read_bytes() for p in (tiny_copy / "data").iterdir()} == before

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C during BPE training

    monkeypatch.setattr(data, "train_bpe", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_copy, "--stage=data", "--force")
    assert "data" not in stages_json(tiny_copy)
    monkeypatch.undo()
    again = run_train(tiny_copy, "--stage=data")
    assert again.returncode == 0 and "data: up to date" not in again.stdout and "tokenizer vcb-bpe" in again.stdout


def test_a_stage_killed_after_writing_part_of_its_files_is_redone(tiny_copy, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(data, "save_tokenizer", disk_full)  # the data files are written, the tokenizer is not
    with pytest.raises(OSError):
        run(tiny_copy, "--stage=data", "--force", "--pref_tau=0.5")
    monkeypatch.undo()
    assert "data" not in stages_json(tiny_copy)
    proc = run_train(tiny_copy, "--pref_tau=0.5", "--stage=data")
    assert proc.returncode == 0 and "data: up to date" not in proc.stdout


# ---- 2. stale or mismatched models are never used silently

@pytest.mark.slow
def test_a_checkpoint_made_with_another_tokenizer_of_the_same_size_is_refused(tiny_copy):
    other = data.train_bpe(" ".join(r["response"] for r in reviews.builtin_task(seed=7, n_sft=300)["sft"]), 300)
    assert other.n_vocab == 300 and other._mergeable_ranks != data.load_tokenizer(tiny_copy / "tokenizer.json")._mergeable_ranks
    data.save_tokenizer(other, tiny_copy / "tokenizer.json")
    with pytest.raises(files.DataError, match=r"tokenizer.json: changed since the data task wrote it .*: run --stage=data again"):
        run(tiny_copy, "--stage=rm")
    (tiny_copy / "stages.json").unlink()  # without the records, the checkpoint itself says which tokenizer it needs
    with pytest.raises(files.DataError, match="sft.pt: made with another tokenizer than .*tokenizer.json"):
        run(tiny_copy, "--stage=rm")


@pytest.mark.slow
def test_edited_data_redoes_every_stage_built_on_it(jsonl_dir, tmp_path):
    out = tmp_path / "out"
    args = ["--data=jsonl", f"--data_dir={jsonl_dir}", "--methods=vcb"]
    assert run_train(out, *args).returncode == 0
    lines = (jsonl_dir / "sft.jsonl").read_text().splitlines()
    write_lines(jsonl_dir / "sft.jsonl", lines[::-1])  # the same records, another order: other files
    assert run_train(out, *args, "--stage=data").returncode == 0  # the data_dir's files changed: redone
    proc = run_train(out, *args, "--stage=rm")
    assert proc.returncode == 2 and "sft outputs" in proc.stderr and "data/sft.jsonl has changed since" in proc.stderr
    proc = run_train(out, *args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "data: up to date" in proc.stdout and "sft: up to date" not in proc.stdout
    for stage in ("sft step", "rm step", "sample:", "align-vcb step", "eval vcb"):
        assert stage in proc.stdout


# ---- 3. a divergence is never saved as finished

@pytest.mark.slow
def test_a_divergence_on_the_last_step_is_not_saved(tiny_copy):
    before = (tiny_copy / "policy_vcb.pt").read_bytes()
    with pytest.raises(runtime.TrainingError, match="align-vcb: the model is broken after the last step .* nothing "
                                                    "was saved as finished"):
        run(tiny_copy, "--stage=align", "--methods=vcb", "--align_steps=1", "--align_lr=1e30")
    assert (tiny_copy / "policy_vcb.pt").read_bytes() == before and "align-vcb" not in stages_json(tiny_copy)
    with pytest.raises(config.ConfigError, match="--weight_decay=nan: must be a number from 0 to 1000"):
        run(tiny_copy, "--stage=sft", "--sft_steps=1", "--weight_decay=nan")


@pytest.mark.slow
def test_broken_weights_are_refused_with_one_line(tiny_copy):
    (tiny_copy / "stages.json").unlink()  # a policy from elsewhere: without the records, the checkpoint itself is checked
    ck = runtime.load_checkpoint(tiny_copy / "policy_vcb.pt")
    ck["model"]["transformer.h.0.mlp.c_fc.weight"][0, 0] = float("nan")
    runtime.save_checkpoint(tiny_copy / "policy_vcb.pt", ck)
    proc = run_train(tiny_copy, "--stage=eval", "--force")
    assert proc.returncode == 2 and "policy_vcb.pt: field 'model.transformer.h.0.mlp.c_fc.weight' holds non-finite weights" in proc.stderr
    ck["model"] = {k: v * 1e30 for k, v in ck["model"].items()}  # finite, but every output overflows
    ck["model"]["transformer.h.0.mlp.c_fc.weight"][0, 0] = 0.0
    runtime.save_checkpoint(tiny_copy / "policy_vcb.pt", ck)
    proc = run_train(tiny_copy, "--stage=eval", "--force")
    assert proc.returncode == 2 and "eval vcb eval: the model's next-token probabilities are not finite" in proc.stderr
    assert "Traceback" not in proc.stderr


# ---- 4. real-data downloads with ordinary problems: skipped and counted

def test_a_truncated_gzip_keeps_the_records_before_the_cut(tmp_path):
    write_hh(tmp_path / "hh")
    blob = (tmp_path / "hh" / "train.jsonl.gz").read_bytes()
    (tmp_path / "hh" / "train.jsonl.gz").write_bytes(blob[:len(blob) * 2 // 3])
    task, notes = corpora.load_task("hh", str(tmp_path / "hh"), {}, seed=0)
    assert 0 < len(task["prefs"]) < 60
    assert "train.jsonl.gz: unreadable after line" in notes[0] and "truncated" in notes[0]


def test_a_plain_file_named_gz_and_a_non_utf8_line(tmp_path):
    folder = tmp_path / "hh"
    write_hh(folder)
    (folder / "train.jsonl.gz").write_text("\n".join(json.dumps({"chosen": c, "rejected": r}) for c, r in HH) + "\n")
    with pytest.raises(files.DataError, match=r"no usable records for sft \(first problem: .*train.jsonl.gz: unreadable "
                                             r"after line 0: truncated or not what its name says"):
        corpora.load_task("hh", str(folder), {}, seed=0)
    (folder / "train.jsonl.gz").unlink()
    lines = [json.dumps({"chosen": c, "rejected": r}).encode() for c, r in HH]
    (folder / "train.jsonl").write_bytes(b"\n".join(lines[:1] + [b'{"chosen": "\xff\xfe"}'] + lines[1:]) + b"\n")
    task, notes = corpora.load_task("hh", str(folder), {}, seed=0)
    assert len(task["prefs"]) == 3 and "train.jsonl:2: not UTF-8 text" in notes[0]


def test_a_folder_where_a_file_is_expected(tmp_path):
    folder = tmp_path / "hh"
    write_hh(folder)
    with gzip.open(folder / "train.jsonl.gz", "rb") as f:
        (folder / "train.jsonl").write_bytes(f.read())
    (folder / "train.jsonl.gz").unlink()
    (folder / "train.jsonl.gz").mkdir()  # a folder of the preferred name: the file beside it is read
    task, _ = corpora.load_task("hh", str(folder), {}, seed=0)
    assert len(task["prefs"]) == 60
    (folder / "train.jsonl").unlink()
    with pytest.raises(files.DataError, match=r"none of train.jsonl.gz, train.jsonl found \(train.jsonl.gz is not a regular file\)"):
        corpora.load_task("hh", str(folder), {}, seed=0)


def test_stray_files_in_tldr_comparisons_are_skipped_and_counted(tmp_path):
    folder = tmp_path / "tldr"
    write_tldr(folder)
    (folder / "comparisons" / ".DS_Store").write_bytes(bytes(range(256)) * 4)
    (folder / "comparisons" / "old").mkdir()
    (folder / "comparisons" / "batch2.json").write_bytes(b"\x00\x01\xff\n")  # binary under a .json name
    task, notes = corpora.load_task("tldr", str(folder), {}, seed=0)
    assert len(task["prefs"]) == 12
    assert ".DS_Store: not a comparisons file" in notes[0] and "skipped 4 malformed records" in notes[0]


# ---- 5. JSON-lines files that are not what they seem

def test_a_lone_surrogate_is_refused_with_its_line_and_field(jsonl_dir, tmp_path):
    lines = (jsonl_dir / "sft.jsonl").read_text().splitlines()
    write_lines(jsonl_dir / "sft.jsonl", lines[:3] + ['{"prompt": "I saw \\ud800 it.", "response": " Good."}'] + lines[3:])
    with pytest.raises(files.DataError, match=r"sft.jsonl:4: field 'prompt' is not valid Unicode text"):
        run(tmp_path / "out", "--data=jsonl", f"--data_dir={jsonl_dir}", "--stage=data")


@pytest.mark.parametrize("kind", ["folder", "fifo", "device"])
def test_anything_but_a_regular_file_is_refused_without_hanging(jsonl_dir, tmp_path, kind):
    target = jsonl_dir / "sft.jsonl"
    target.unlink()
    if kind == "folder":
        target.mkdir()
    elif kind == "fifo":
        os.mkfifo(target)  # opening it for reading would wait for a writer forever
    else:
        target.symlink_to("/dev/zero")  # reading it never ends
    message = "is a folder, not a file" if kind == "folder" else "not a regular file (a pipe, socket or device); refused"
    with pytest.raises(files.DataError, match=re.escape(message)):
        run(tmp_path / "out", "--data=jsonl", f"--data_dir={jsonl_dir}", "--stage=data")


# ---- 6. options are checked up front (the bad values themselves: tests/test_train.py)

def test_an_out_dir_that_cannot_be_created(tmp_path):
    (tmp_path / "file").write_text("")
    proc = run_train(tmp_path / "file" / "out", tiny=False)
    assert proc.returncode == 2 and "cannot create it" in proc.stderr and "Traceback" not in proc.stderr


# ---- 7. results are standard JSON

def strict_json(text):
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")
    return json.loads(text, parse_constant=refuse)


def test_nan_and_infinity_are_written_as_null(tmp_path):
    files.write_json(tmp_path / "r.json", {"gold_correlation": float("nan"), "kl": [1.0, float("inf")], "n": 3})
    assert strict_json((tmp_path / "r.json").read_text()) == {"gold_correlation": None, "kl": [1.0, None], "n": 3}
    files.write_jsonl(tmp_path / "r.jsonl", [{"x": float("-inf")}])
    assert strict_json((tmp_path / "r.jsonl").read_text()) == {"x": None}


def test_the_run_writes_only_standard_json(tiny_run):
    for file in list(tiny_run[0].glob("*.json")) + [tiny_run[0] / "curves.jsonl"]:
        for line in file.read_text().splitlines() if file.suffix == ".jsonl" else [file.read_text()]:
            strict_json(line)


# ---- 8. Ctrl-C

@pytest.mark.slow
def test_ctrl_c_prints_one_line_and_the_same_command_resumes(tiny_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(tiny_run[0], out)
    args = [f"--out_dir={out}", *TINY, "--stage=sft", "--force", "--sft_steps=400", "--ckpt_interval=5"]
    # A job started in the background of a script inherits SIGINT ignored, and Python keeps it so: the child
    # gets the default disposition back, as a program in a terminal has, wherever the tests are run from.
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not (out / "sft.ckpt.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted during sft step") and "run the same command again" in last
    again = run_train(out, "--stage=sft", "--sft_steps=400", "--ckpt_interval=5")
    assert again.returncode == 0 and "sft: resuming from" in again.stdout


# ---- 9. tried as a new user would

def test_bom_crlf_and_special_token_text_in_jsonl_files(jsonl_dir, tmp_path):
    lines = (jsonl_dir / "sft.jsonl").read_text().splitlines()
    lines[0] = json.dumps({"prompt": "A film called <|endoftext|>.", "response": " It ends <|endoftext|> twice."})
    (jsonl_dir / "sft.jsonl").write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n")
    run(tmp_path / "out", "--data=jsonl", f"--data_dir={jsonl_dir}", "--stage=data")
    first = files.read_jsonl(tmp_path / "out" / "data" / "sft.jsonl")[0]
    assert first["prompt"] == "A film called <|endoftext|>." and first["response"] == " It ends <|endoftext|> twice."
    enc = data.load_tokenizer(tmp_path / "out" / "tokenizer.json")
    prompt, (response,) = data.encode_group(enc, first["prompt"], [first["response"]])
    ids = prompt + response
    assert ids.count(enc.eot_token) == 2 and ids[0] == ids[-1] == enc.eot_token  # the text stays text


@pytest.mark.slow
def test_rewards_too_large_for_float32_are_refused(tiny_copy):
    (tiny_copy / "stages.json").unlink()  # candidates from elsewhere: without the records, the file itself is checked
    cands = files.read_jsonl(tiny_copy / "candidates.jsonl")
    cands[1]["rewards"] = [1e39, 0.0, 1.0]
    files.write_jsonl(tiny_copy / "candidates.jsonl", cands)
    with pytest.raises(files.DataError, match=r"candidates.jsonl:2: field 'rewards\[0\]' is 1e\+39, not a finite float32 number"):
        run(tiny_copy, "--stage=align", "--methods=vcb")
    cands[1]["rewards"] = [1e30, 2e30, 3e30]  # large but representable: VCB's sigma(x) scales them away
    files.write_jsonl(tiny_copy / "candidates.jsonl", cands)
    run(tiny_copy, "--stage=align", "--methods=vcb")
    assert math.isfinite(runtime.load_checkpoint(tiny_copy / "policy_vcb.pt")["model"]["lm_head.weight"].sum())


def test_a_candidates_file_that_is_not_json_lines(tiny_copy):
    (tiny_copy / "stages.json").unlink()  # candidates from elsewhere: without the records, the file itself is checked
    (tiny_copy / "candidates.jsonl").write_bytes(b"\x1f\x8b\x08\x00 gzip, not text")
    with pytest.raises(files.DataError, match=r"candidates.jsonl:1: not UTF-8 text"):
        run(tiny_copy, "--stage=align", "--methods=vcb")


def test_weights_that_diverge_part_way_are_not_saved_as_the_last_good_checkpoint(tmp_path):
    cfg = config.parse_args([f"--out_dir={tmp_path}", "--device=cpu", "--ckpt_interval=2", "--log_interval=100", "--warmup_steps=0",
                             "--weight_decay=0"])
    env = runtime.setup(cfg)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, vocab_size=11, n_layer=1, n_head=1, n_embd=8))
    steps_seen = []

    def loss_fn(m, idx):  # no gradient for three steps, so at lr=1e30 the weights only blow up at step 3:
        loss = m.gpt.logits(m.gpt(torch.tensor([idx])))[..., 0].sum()  # finite, but so large that every output overflows
        if torch.is_grad_enabled():
            steps_seen.append(1)
            loss = loss * 0 if len(steps_seen) < 4 else loss
        return loss, {}

    task = records.Task("sft", "sft", [], [str(tmp_path / "sft.pt")])
    with pytest.raises(runtime.TrainingError, match=r"sft: the model is broken after step 4 .* \(step 2\), is kept"):
        train.train(cfg, env, task, model, 10, 6, 2, 1e30, loss_fn, len, seed=0)
    ck = runtime.load_checkpoint(tmp_path / "sft.ckpt.pt")
    assert ck["step"] == 2 and all(v.abs().max() < 10 for v in ck["model"].values())
