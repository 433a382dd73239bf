"""Tokenizers (round trip, determinism, our own rank file), sequence encoding and the built-in task."""
import json
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

import data
import packing
from machinery import files
from tasks import reviews


SYLLABLES = ["ka", "ri", "to", "me", "su", "na", "lo", "pe", "ba", "de", "gi", "fu", "zo", "str", "ing", "ed"]


def corpus(n_chars, seed=0):
    """Made-up words with Zipf-like frequencies: enough variety to fill a 1024-token vocabulary."""
    rng = random.Random(seed)
    words = ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(3000)]
    weights = [1 / (i + 1) for i in range(len(words))]
    out, size = [], 0
    while size < n_chars:
        s = " ".join(rng.choices(words, weights, k=10)).capitalize() + rng.choice([". ", "! ", ", 42 ", "\n"])
        out.append(s)
        size += len(s)
    return "".join(out)


@pytest.fixture(scope="module")
def bpe():
    return data.train_bpe(corpus(200_000), vocab_size=1024)


def test_bpe_reaches_its_vocabulary_size_and_is_deterministic(bpe):
    assert bpe.n_vocab == 1024 and bpe.eot_token == 1023
    again = data.train_bpe(corpus(200_000), vocab_size=1024)
    assert again._mergeable_ranks == bpe._mergeable_ranks
    sample = corpus(2000, seed=1)
    assert len(bpe.encode_ordinary(sample)) < len(sample.encode()) / 2  # it really compresses


@given(st.text(max_size=200))
def test_round_trip_any_unicode_string(bpe, s):
    for enc in (bpe, data.byte_tokenizer()):
        assert enc.decode(enc.encode_ordinary(s)) == s


def test_special_token_text_in_data_is_plain_text(bpe):
    ids = bpe.encode_ordinary("a <|endoftext|> b")
    assert bpe.eot_token not in ids and bpe.decode(ids) == "a <|endoftext|> b"


def test_byte_tokenizer_is_256_bytes_and_eot():
    enc = data.byte_tokenizer()
    assert enc.n_vocab == 257 and enc.eot_token == 256
    assert enc.encode_ordinary("é") == list("é".encode())


def test_saved_tokenizer_loads_identically_and_a_rewritten_file_is_reread(bpe, tmp_path):
    path = tmp_path / "tokenizer.json"
    data.save_tokenizer(bpe, path)
    loaded = data.load_tokenizer(path)
    assert loaded._mergeable_ranks == bpe._mergeable_ranks and loaded.n_vocab == bpe.n_vocab
    text = corpus(500, seed=3)
    assert loaded.encode_ordinary(text) == bpe.encode_ordinary(text)
    smaller = data.train_bpe(corpus(50_000, seed=2), vocab_size=300)
    data.save_tokenizer(smaller, path)  # same path, new vocabulary: no stale cached copy
    assert data.load_tokenizer(path).n_vocab == 300


@pytest.mark.parametrize("corruption, message", [
    (lambda spec: "{not json", "malformed JSON"),
    (lambda spec: json.dumps({**spec, "format": "other"}), "field 'format' is \"other\", not a tokenizer file"),
    (lambda spec: json.dumps({**spec, "tokens": spec["tokens"][:10]}), "field 'tokens': every single byte must be a token"),
    (lambda spec: json.dumps({**spec, "tokens": spec["tokens"] + ["%%%"]}), "field 'tokens\\[1023\\]' is not base64"),
    (lambda spec: json.dumps({**spec, "tokens": spec["tokens"] + [spec["tokens"][300]]}), "field 'tokens': every single byte must be a token and no token may repeat"),
    (lambda spec: json.dumps({k: v for k, v in spec.items() if k != "pat_str"}), "missing field 'pat_str'"),
])
def test_corrupt_tokenizer_file_is_a_one_line_error(bpe, tmp_path, corruption, message):
    path = tmp_path / "tokenizer.json"
    data.save_tokenizer(bpe, path)
    path.write_text(corruption(json.loads(path.read_text())))
    with pytest.raises(files.DataError, match="tokenizer.json: " + message) as e:
        data.load_tokenizer(path)
    assert "\n" not in str(e.value)


def sequence(enc, prompt, response, block_size):
    """One prompt and response as the models read them: (ids, where the response starts, whether cut)."""
    p, rs, cut = data.fit(*data.encode_group(enc, prompt, [response]), block_size)
    return p + rs[0], len(p), cut > 0


def test_a_sequence_marks_the_response_and_is_cut_from_the_left_of_its_prompt():
    enc = data.byte_tokenizer()
    ids, start, cut = sequence(enc, "abc", "de", block_size=32)
    assert ids == [256, 97, 98, 99, 100, 101, 256] and start == 4 and not cut
    ids, start, cut = sequence(enc, "0123456789", "xy", block_size=8)
    assert cut and len(ids) == 8 and start == 5 and enc.decode(ids[1:start]) == "6789" and ids[start:] == [120, 121, 256]
    ids, start, cut = sequence(enc, "p", "y" * 20, block_size=8)
    assert cut and len(ids) == 8 and start == 2  # a response that alone does not fit is cut
    batch = packing.pad([([1, 2], [[3, 4]]), ([5], [[6]])], block_size=8)  # the plain form: a right-padded row each
    assert batch.idx.tolist() == [[1, 2, 3, 4], [5, 6, 0, 0]]
    assert batch.targets.tolist() == [3, 4, 6] and batch.cols.tolist() == [1, 2, 4]  # each response token, and its predictor


def test_a_prompt_for_generation_starts_with_the_end_of_text_token_even_when_cut():
    """Every training sequence starts with <|endoftext|> (data.fit); a prompt cut to fit the context
    for generation must too, or the model samples after a context it never saw in training."""
    enc = data.byte_tokenizer()
    assert data.encode_prompt(enc, "abc", 10) == [256, 97, 98, 99]
    assert data.encode_prompt(enc, "0123456789", 4) == [256, 55, 56, 57]  # the last 3 characters, after it
    assert data.encode_prompt(enc, "0123456789", 1) == [256]
    ids, start, _ = sequence(enc, "0123456789", "xy", block_size=8)
    assert data.encode_prompt(enc, "0123456789", start) == ids[:start]  # what training saw before the response


def test_builtin_task_is_seeded_graded_and_keeps_eval_prompts_out_of_training():
    a = reviews.builtin_task(seed=3, n_sft=300, n_prefs=100, n_align=50, n_eval=40, n_ood=20)
    b = reviews.builtin_task(seed=3, n_sft=300, n_prefs=100, n_align=50, n_eval=40, n_ood=20)
    assert a == b
    held_out = {r["prompt"] for r in a["eval_prompts"]}
    train = {r["prompt"] for name in ("sft", "prefs", "align_prompts") for r in a[name]}
    assert not held_out & train
    gold = reviews.gold_reward([r["response"] for r in a["sft"]])
    assert min(gold) < -0.5 and max(gold) > 0.5 and len({round(g, 1) for g in gold}) >= 12  # graded, not binary
    assert reviews.gold_reward(["It was not bad at all."])[0] > 0 > reviews.gold_reward(["It was not great."])[0]
    agree = sum(c > r for c, r in (reviews.gold_reward([p["chosen"], p["rejected"]]) for p in a["prefs"]))
    assert 0.6 < agree / len(a["prefs"]) < 0.97  # mostly right, noisy like human labels
