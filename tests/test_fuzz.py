"""Bad input by class (docs/guarantees.md), the files: generated inputs of classes 2 to 4 for every
reader the project has, each asserting the same guarantee: a one-line error naming the file, line and
field (exit status 2 from the command line), or, where real data is read leniently, a counted and
named skip; never a traceback, never a partly written output, never a silently wrong result.

    2. real-data records of the wrong shape       (hh, tldr posts and comparisons, jsonl, candidates)
    3. pathological files                         (deep nesting, huge numbers and lines, bad bytes, gzip)
    4. valid containers, wrong content            (checkpoints, tokenizer.json, config.json, presets)

Classes 1 and 5, the options, are in tests/test_fuzz_options.py. The suite runs the fast part
(derandomised, as every property test here); the longer run is

    HYPOTHESIS_PROFILE=fuzz python -m pytest tests/test_fuzz.py tests/test_fuzz_options.py
"""
import dataclasses
import gzip
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import data
import train
import vcb
from conftest import TINY
from generators import JSON_LEAVES, JSON_VALUES, SCALE, dumps, folder, mutated, outcome, skipped
from machinery import config, files, runtime
from machinery.progress import Progress
from tasks import corpora
from test_real_data import HH


# ---- class 2: real-data records of the wrong shape, read leniently (hh, tldr) or strictly (jsonl) --------

HH_RECORD = {"chosen": HH[0][0], "rejected": HH[0][1]}


@given(st.lists(mutated(HH_RECORD), min_size=1, max_size=4))
def test_hh_records_of_any_shape_are_kept_whole_or_skipped_and_counted(bad):
    with folder() as d:
        lines = [dumps(r) for r in bad] + [dumps(HH_RECORD)] * 3
        with gzip.open(d / "train.jsonl.gz", "wt") as f:
            f.write("\n".join(lines) + "\n")
        (d / "test.jsonl").write_text(dumps(HH_RECORD) + "\n")
        task, notes = corpora.load_task("hh", str(d), {}, seed=0)
    assert len(task["prefs"]) + skipped(notes) == len(lines)  # every record kept or counted
    for r in task["prefs"]:
        assert all(isinstance(r[k], str) and r[k].strip() for k in ("prompt", "chosen", "rejected"))
        assert r["prompt"].endswith("\n\nAssistant:")
    if notes:  # the skips are named by file and line: only the generated records can be bad
        named = [int(n) for n in re.findall(r"train\.jsonl\.gz:(\d+)", notes[0])]
        assert named and all(1 <= n <= len(bad) for n in named), notes[0]


POST = {"id": "t3_1", "subreddit": "cooking", "title": "Soup", "post": "My soup is too salty.", "summary": "salty soup"}
COMPARISON = {"info": {"id": "t3_1", "subreddit": "cooking", "title": "Soup", "post": "My soup is too salty."},
              "summaries": [{"text": " add potato", "policy": "a"}, {"text": " soup", "policy": "b"}],
              "choice": 1, "split": "train"}


@given(st.lists(mutated(POST), max_size=3), st.lists(mutated(COMPARISON), max_size=3))
def test_tldr_posts_and_comparisons_of_any_shape_are_kept_whole_or_skipped_and_counted(posts, comparisons):
    with folder() as d:
        (d / "train.jsonl").write_text("".join(dumps(r) + "\n" for r in posts + [POST]))
        (d / "test.jsonl").write_text(dumps(POST) + "\n")
        (d / "comparisons").mkdir()
        (d / "comparisons" / "batch1.json").write_text("".join(dumps(r) + "\n" for r in comparisons + [COMPARISON]))
        task, notes = corpora.load_task("tldr", str(d), {}, seed=0)
    elsewhere = sum(isinstance(r, dict) and isinstance(r.get("split"), str) and not r["split"].startswith("train")
                    for r in comparisons)  # a comparison of another split is not for training: neither kept nor skipped
    total = len(posts) + 1 + 1 + len(comparisons) + 1  # train.jsonl, test.jsonl (one valid post), comparisons
    accounted = len(task["sft"]) + 1 + len(task["prefs"]) + skipped(notes)
    assert accounted <= total <= accounted + elsewhere
    for r in task["prefs"]:
        assert r["prompt"].startswith("SUBREDDIT: r/") and r["chosen"].strip() and r["rejected"].strip()
    for r in task["sft"]:
        assert isinstance(r["response"], str) and r["response"].strip()


def test_a_float_or_a_bool_where_an_index_is_used_is_skipped_not_read():
    """Found by the generator: choice 1.0 indexed the summaries (a TypeError), choice true read as 1."""
    for choice in (1.0, True, 2, -1, "1", None):
        with folder() as d:
            (d / "train.jsonl").write_text(dumps(POST) + "\n")
            (d / "test.jsonl").write_text(dumps(POST) + "\n")
            (d / "comparisons").mkdir()
            (d / "comparisons" / "b.json").write_text(dumps({**COMPARISON, "choice": choice}) + "\n" + dumps(COMPARISON) + "\n")
            task, notes = corpora.load_task("tldr", str(d), {}, seed=0)
        assert len(task["prefs"]) == 1 and skipped(notes) == 1 and "b.json:1: field 'choice'" in notes[0], choice


def write_jsonl_task(d, bad_file=None, bad_lines=()):
    good = {"sft": {"prompt": "I saw Heat.", "response": " Great film."},
            "prefs": {"prompt": "I saw Heat.", "chosen": " Great.", "rejected": " Bad."},
            "align_prompts": {"prompt": "I saw Heat."}, "eval_prompts": {"prompt": "I saw Up."}}
    for name, rec in good.items():
        lines = [dumps(rec)] * 2 + (list(bad_lines) if name == bad_file else [])
        (d / f"{name}.jsonl").write_text("".join(line + "\n" for line in lines))
    return good


@given(st.sampled_from(["sft", "prefs", "align_prompts", "eval_prompts"]), st.data())
def test_our_jsonl_files_refuse_any_wrong_field_by_file_line_and_field(name, draw):
    with folder() as d:
        good = write_jsonl_task(d)
        rec = draw.draw(mutated(good[name]))
        write_jsonl_task(d, name, [dumps(rec)])
        result = outcome(lambda: corpora.load_task("jsonl", str(d), {}, seed=0))
    if isinstance(result, Exception):
        assert f"{name}.jsonl:3: " in str(result) and ("field '" in str(result) or "expected a JSON object" in str(result))
    else:  # accepted: then it has every field of its schema, of its type, non-empty (extra fields are allowed)
        kept = result[0][name][2]
        assert all(isinstance(kept[k], str) and kept[k].strip() for k in data.SCHEMAS[name])


def candidates_file(tiny_run):
    return files.read_jsonl(tiny_run[0] / "candidates.jsonl")


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_a_candidates_file_of_any_shape_is_read_whole_or_refused_by_line_and_field(tiny_run, draw):
    records = candidates_file(tiny_run)[:3]
    line = draw.draw(st.integers(0, 2))
    records[line] = draw.draw(mutated(records[line]))
    cfg = config.parse_args([f"--out_dir={tiny_run[0]}", *TINY])
    env = runtime.setup(cfg)
    enc = train.tokenizer(cfg)
    with folder() as d:
        files.write_jsonl(d / "candidates.jsonl", [files.finite(r) for r in records])
        text = (d / "candidates.jsonl").read_text().splitlines()
        text[line] = dumps(records[line])  # NaN and Infinity as Python writes them
        (d / "candidates.jsonl").write_text("\n".join(text) + "\n")
        result = outcome(lambda: train.candidates(cfg, env, enc, str(d / "candidates.jsonl")))
    if isinstance(result, Exception):
        assert "candidates.jsonl:" in str(result)
    else:
        B, n = result.rewards.shape
        assert B == 3 and n >= 2 and result.ref_logps.shape == (B, n) and len(result.groups) == B
        assert result.rewards.isfinite().all() and result.ref_logps.isfinite().all()
        assert vcb.reward_sigma(result.rewards).isfinite().all()


# ---- class 3: pathological files ----------------------------------------------------------------------

PATHOLOGICAL = st.one_of(
    st.integers(1, 200_000).map(lambda k: "[" * k + "]" * (k % 3)),        # nesting past the parser's recursion
    st.integers(1, 200_000).map(lambda k: '{"prompt": ' + "[" * k + "1" + "]" * k + "}"),
    st.integers(1, 10_000).map(lambda k: '{"prompt": ' + "9" * k + "}"),     # an integer of k digits
    st.sampled_from(["[" * 100_000, '{"prompt": ' + "9" * 5000 + "}", '{"prompt": 1e999}', '{"prompt": NaN}', '{"prompt": -Infinity}', '{"prompt": "\\ud800"}',
                     '{"prompt": "a"}{"prompt": "b"}', '{"prompt": "a", "prompt": 3}', '\ufeff{"prompt": "x"}',
                     "\x00", '{"prompt": "a\x00b"}', "null", "[]", '"text"', "1", "\r", " ", "{}"]),
    st.integers(1, 2_000_000).map(lambda k: '{"prompt": "' + "x" * k + '"}'),  # a long line
)
BAD_BYTES = st.binary(min_size=1, max_size=40)


@settings(max_examples=30 * SCALE)
@given(st.lists(st.one_of(PATHOLOGICAL, BAD_BYTES), min_size=1, max_size=3))
def test_pathological_lines_are_refused_strictly_or_skipped_leniently(lines):
    raw = b"".join((x if isinstance(x, bytes) else x.encode("utf-8", "surrogatepass")) + b"\n" for x in lines)
    with folder() as d:
        write_jsonl_task(d)
        (d / "eval_prompts.jsonl").write_bytes(raw)                        # strict: our own files
        result = outcome(lambda: corpora.load_task("jsonl", str(d), {}, seed=0))
        if not isinstance(result, Exception):
            assert all(isinstance(r["prompt"], str) and r["prompt"].strip() for r in result[0]["eval_prompts"])
        h = d / "hh"
        h.mkdir()
        with gzip.open(h / "train.jsonl.gz", "wb") as f:                 # lenient: a published data set
            f.write(raw + (dumps(HH_RECORD) + "\n").encode())
        (h / "test.jsonl").write_bytes(raw + (dumps(HH_RECORD) + "\n").encode())
        task, notes = corpora.load_task("hh", str(h), {}, seed=0)
        assert len(task["prefs"]) >= 1 and len(task["prefs"]) + skipped(notes) >= raw.count(b"\n")
        for reader in (data.load_tokenizer, lambda f: config.read_options(f, "--preset"), records_reader):
            (d / "file.json").write_bytes(raw)
            outcome(lambda: reader(d / "file.json"))


def records_reader(file):
    """stages.json and the scored samples are the run's own: unreadable means redo, never an error."""
    os.replace(file, file.parent / "stages.json")
    assert runtime_records(file.parent) == {}


def runtime_records(out):
    from machinery import records
    return records.read_records(config.Config(out_dir=str(out)))


@settings(max_examples=20 * SCALE)
@given(st.integers(0, 400), st.sampled_from(["cut", "concatenated", "garbage", "empty"]))
def test_a_truncated_or_concatenated_gzip_keeps_what_came_before(cut, how):
    body = ("\n".join(dumps({"chosen": c, "rejected": r}) for c, r in HH * 4) + "\n").encode()
    packed = gzip.compress(body)
    blob = {"cut": packed[:cut], "concatenated": packed + packed, "garbage": packed + b"not gzip at all",
            "empty": b""}[how]
    with folder() as d:
        (d / "train.jsonl.gz").write_bytes(blob)
        (d / "test.jsonl").write_text(dumps(HH_RECORD) + "\n")
        result = outcome(lambda: corpora.load_task("hh", str(d), {}, seed=0))
    if how == "concatenated":
        assert len(result[0]["prefs"]) == 24
    elif not isinstance(result, Exception):
        assert 1 <= len(result[0]["prefs"]) <= 12
    else:
        assert "no usable records for" in str(result) or "train.jsonl.gz" in str(result)


@pytest.mark.parametrize("kind", ["hh", "tldr", "jsonl"])
def test_an_empty_folder_names_what_is_missing(kind):
    with folder() as d:
        e = outcome(lambda: corpora.load_task(kind, str(d), {}, seed=0))
    assert isinstance(e, files.DataError) and str(d) in str(e)


# ---- class 4: valid containers, wrong content --------------------------------------------------------

def test_tied_weights_that_differ_are_refused(tiny_run):
    ck = runtime.load_checkpoint(tiny_run[0] / "policy_vcb.pt")
    ck["model"] = {**ck["model"], "lm_head.weight": ck["model"]["lm_head.weight"] + 1}  # the embedding keeps its own
    with folder() as d:
        torch.save(ck, d / "policy.pt")
        e = outcome(lambda: runtime.checkpoint_model(str(d / "policy.pt"), runtime.load_checkpoint(str(d / "policy.pt"))))
    assert isinstance(e, files.DataError) and "ties" in str(e), e


def tensor_like(v):
    """A stand-in of another kind for a checkpoint entry: another dtype or shape, a plain value, a dict."""
    return st.sampled_from([v.long(), v.bool(), v.half(), v.reshape(-1)[:1], v.flatten(), torch.zeros(0), v * float("nan"),
                            v.sum(), 3, "text", None, {"a": v}, [v]])


@st.composite
def checkpoint_mutation(draw, ck):
    ck = dict(ck)
    for _ in range(draw(st.integers(1, 3))):
        part = draw(st.sampled_from(["model", "model", "model", "model_args", "model_args", "tokenizer", "whole", "drop"]))
        if part == "model":
            weights = dict(ck.get("model", {})) if isinstance(ck.get("model"), dict) else {}
            if weights:
                key = draw(st.sampled_from(sorted(weights)))
                weights[key] = draw(tensor_like(weights[key])) if torch.is_tensor(weights[key]) else None
                if draw(st.booleans()):
                    weights.pop(key)
            ck["model"] = weights
        elif part == "model_args" and isinstance(ck.get("model_args"), dict):
            ck["model_args"] = draw(mutated(ck["model_args"]))
        elif part == "tokenizer":
            ck["tokenizer"] = draw(JSON_LEAVES)
        elif part == "drop":
            ck.pop(draw(st.sampled_from(sorted(ck))), None)
        else:
            return draw(st.sampled_from([torch.zeros(3), [1, 2], "text", 7, None, {}]))
    return ck


@settings(suppress_health_check=[HealthCheck.too_slow], max_examples=80 * SCALE)
@given(st.data())
def test_a_checkpoint_of_the_wrong_content_is_refused_by_file_and_field(tiny_run, draw):
    cfg = config.parse_args([f"--out_dir={tiny_run[0]}", *TINY])
    env, enc = runtime.setup(cfg), train.tokenizer(cfg)
    good = runtime.load_checkpoint(tiny_run[0] / "policy_vcb.pt")
    ck = draw.draw(checkpoint_mutation(good))
    with folder() as d:
        torch.save(ck, d / "policy.pt")
        model = outcome(lambda: runtime.load_model(str(d / "policy.pt"), env, enc, cfg))
        exported = outcome(lambda: runtime.checkpoint_model(str(d / "policy.pt"), runtime.load_checkpoint(str(d / "policy.pt"))))
    if isinstance(model, Exception):
        assert "policy.pt" in str(model)
    else:  # accepted: its weights are the file's, every one a finite floating-point tensor of its shape
        sd = model.state_dict()
        for k, v in ck["model"].items():
            assert v.is_floating_point() and v.isfinite().all() and torch.equal(sd[k], v.to(sd[k].dtype)), k
        assert model.logits(model(torch.randint(0, enc.n_vocab, (1, 8))))[0].isfinite().all()
    assert isinstance(exported, Exception) or isinstance(exported, torch.nn.Module)


PROGRESS = {}  # a run folder holding a resumable checkpoint of align-dpo, made once


def progress_run(tiny_run):
    if not PROGRESS:
        out = Path(tempfile.mkdtemp()) / "out"
        shutil.copytree(tiny_run[0], out)
        cfg = config.parse_args([f"--out_dir={out}", *TINY, "--methods=dpo", "--align_steps=4"])
        env, enc = runtime.setup(cfg), train.tokenizer(cfg)
        task = train.align_task(cfg, "dpo", cfg.seed, "align-dpo", str(out / "policy_dpo.pt"))
        model = runtime.load_model(str(out / "sft.pt"), env, enc, cfg)
        optimizer = model.configure_optimizers(cfg.weight_decay, cfg.align_lr, (0.9, 0.95), "cpu")
        progress = Progress(cfg, env, task, {"model": model, "optimizer": optimizer}, total=4)
        progress.checkpoint(2, probe=lambda: torch.zeros(()))  # as an interrupted run leaves it
        PROGRESS.update(out=out, ck=torch.load(out / "align-dpo.ckpt.pt", weights_only=True))
    return PROGRESS["out"], PROGRESS["ck"]


@settings(suppress_health_check=[HealthCheck.too_slow], max_examples=8 * SCALE)
@given(st.data())
def test_a_resumable_checkpoint_of_the_wrong_content_is_refused_or_restarted(tiny_run, draw):
    """A task's *.ckpt.pt that is not what its task saved is a one-line error that says to delete it
    (made with other settings, the task starts over): never a traceback in the middle of a run."""
    src, ck = progress_run(tiny_run)
    bad = draw.draw(st.one_of(
        mutated({k: ck[k] for k in ("step", "extra", "settings")}).map(lambda m: {**ck, **m}),
        st.sampled_from(["model", "optimizer", "rng"]).map(lambda k: {**ck, k: {"x": 1}}),
        st.sampled_from(["model", "optimizer", "rng", "step"]).map(lambda k: {x: v for x, v in ck.items() if x != k}),
        st.just(torch.zeros(2))))
    with folder() as d:
        out = d / "out"
        shutil.copytree(src, out)
        torch.save(bad, out / "align-dpo.ckpt.pt")
        result = outcome(lambda: train.main([f"--out_dir={out}", *TINY, "--stage=align", "--methods=dpo",
                                             "--align_steps=4", "--force"]))
        if isinstance(result, Exception):
            assert "align-dpo.ckpt.pt" in str(result) and (out / "align-dpo.ckpt.pt").exists()
        else:  # resumed or started over: a finished policy either way
            assert (out / "policy_dpo.pt").exists() and not (out / "align-dpo.ckpt.pt").exists()


SPEC = None


def tokenizer_spec():
    global SPEC
    if SPEC is None:
        with folder() as d:
            data.save_tokenizer(data.train_bpe("the cat sat on the mat " * 50, 270), d / "t.json")
            SPEC = json.loads((d / "t.json").read_text())
    return SPEC


@given(st.data())
def test_a_tokenizer_file_of_the_wrong_schema_is_refused_by_field(draw):
    spec = draw.draw(mutated(tokenizer_spec()))
    with folder() as d:
        (d / "tokenizer.json").write_text(dumps(spec))
        enc = outcome(lambda: data.load_tokenizer(d / "tokenizer.json"))
    if isinstance(enc, Exception):
        assert "tokenizer.json" in str(enc)
    else:  # accepted: a tokenizer that round-trips text, like any of ours
        assert enc.decode(enc.encode_ordinary("the cat, 3 times")) == "the cat, 3 times"


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_a_run_config_of_the_wrong_schema_is_refused_by_option(tiny_run, draw):
    saved = json.loads((tiny_run[0] / "config.json").read_text())
    bad = draw.draw(mutated(saved))
    with folder() as d:
        shutil.copy(tiny_run[0] / "config.json", d / "config.json")
        (d / "config.json").write_text(dumps(bad))
        cfg = outcome(lambda: config.run_config(str(d)))
    if isinstance(cfg, Exception):
        assert "config.json" in str(cfg)
    else:
        config.validate(cfg)
        config.check_ranges(cfg)


def gpt2_dir():
    """A GPT-2 checkpoint of a tiny model (model.safetensors + config.json), made once."""
    from model import GPT, GPTConfig
    from tools import gpt2
    if not GPT2_DIR:
        GPT2_DIR["dir"] = Path(tempfile.mkdtemp())
        gpt2.save_pretrained(GPT(GPTConfig(vocab_size=300, n_layer=1, n_head=2, n_embd=32, block_size=64)), GPT2_DIR["dir"])
        GPT2_DIR["config"] = json.loads((GPT2_DIR["dir"] / "config.json").read_text())
    return GPT2_DIR["dir"], GPT2_DIR["config"]


GPT2_DIR = {}
GPT2_KEYS = ["model_type", "vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner", "activation_function",
             "layer_norm_epsilon", "scale_attn_weights"]  # what gpt2.gpt2_config reads


@pytest.mark.parametrize("key", GPT2_KEYS)
@settings(suppress_health_check=[HealthCheck.too_slow], max_examples=15 * SCALE)
@given(value=JSON_VALUES)
def test_a_gpt2_config_json_of_the_wrong_schema_is_refused_by_field(key, value):
    from tools import gpt2
    folder_in, good = gpt2_dir()
    assert key in good
    with folder() as d:
        shutil.copy(folder_in / "model.safetensors", d / "model.safetensors")
        (d / "config.json").write_text(dumps({**good, key: value}))
        model = outcome(lambda: gpt2.from_pretrained(d / "model.safetensors", log=lambda msg: None))
    if isinstance(model, Exception):
        assert "config.json" in str(model)
    else:  # accepted: the shape the weights and the config agree on
        assert (model.config.n_layer, model.config.n_embd, model.config.vocab_size) == (1, 32, 300)
        assert model.config.n_head in (1, 2, 4, 8, 16, 32)


@given(st.dictionaries(st.sampled_from([f.name for f in dataclasses.fields(config.Config)] + ["preset", "x"]),
                       JSON_VALUES, max_size=4))
def test_a_preset_of_any_content_is_applied_whole_or_refused_by_file_and_option(options):
    with folder() as d:
        (d / "p.json").write_text(dumps(options))
        cfg = outcome(lambda: config.parse_args([f"--preset={d / 'p.json'}"]))
    if isinstance(cfg, Exception):
        assert "p.json" in str(cfg)
    else:
        config.check_ranges(cfg)


@pytest.mark.parametrize("options", [{"stage": 0}, {"device": "tpu"}, {"methods": "vcb,vcb"}, {"sweep_seeds": "1,x"},
                                     {"n_sft": 0}])  # the last is wrong only with another option (--data=builtin)
def test_a_preset_value_wrong_alone_or_with_the_defaults_is_refused_naming_the_file(options):
    with folder() as d:
        (d / "p.json").write_text(dumps(options))
        e = outcome(lambda: config.parse_args([f"--preset={d / 'p.json'}"]))
    assert isinstance(e, config.ConfigError) and str(e).startswith(str(d / "p.json")), e
