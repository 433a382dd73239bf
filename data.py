"""
data.py: the tokenizer, the task's files and the token sequences the models read.

- Tokenizer: a byte-level BPE the project trains itself (deterministic, seconds on 1 MB), served
  through tiktoken.Encoding and saved as a JSON rank file that we write and parse ourselves; GPT-2's
  own, built from the two files OpenAI published with it; a plain 256-byte encoding for tests. Every tokenizer here is a tiktoken.Encoding with
  <|endoftext|>.
- Sequences: a prompt and its responses as token ids, <|endoftext|> + prompt, then each response +
  <|endoftext|>, cut to fit the context (encode_group, fit); prompts for generation (encode_prompt).
  packing.py turns groups into the batches the models read.
- The task's files: the records each stage hands the next (SCHEMAS), and the scored candidates that
  alignment learns from (read_candidates).

The records come from tasks/reviews.py (the built-in task) or tasks/corpora.py (the paper's data sets
and your own files); reading and writing any file goes through machinery/files.py.
"""
import base64
import hashlib
import heapq
import os
import re
from collections import Counter, defaultdict
from dataclasses import dataclass

import tiktoken
import torch

from machinery.files import DataError, field, read_json, read_jsonl, shown, text_lines, write_json, write_text


EOT = "<|endoftext|>"
# Pre-tokenisation pattern (GPT-2's, written with classes that Python's re and tiktoken's regex engine
# read the same way, so training and encoding split text alike): contractions, letters, digits,
# other symbols, whitespace. Together they match every character, so decode(encode(s)) == s.
PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+"""


# -----------------------------------------------------------------------------
# tokenizer

def byte_tokenizer():
    """256 single bytes + <|endoftext|> (id 256): no training, no files. For tests."""
    return tiktoken.Encoding(name="bytes", pat_str=PAT_STR,
                             mergeable_ranks={bytes([i]): i for i in range(256)},
                             special_tokens={EOT: 256})


def train_bpe(text, vocab_size):
    """Byte-level BPE: 256 byte tokens, then the most frequent adjacent pair merged, repeatedly,
    until vocab_size - 1 tokens (the last id is <|endoftext|>). Deterministic: ties go to the pair
    with the larger ids. Pair counts are updated incrementally, so 1 MB of text takes seconds.
    Returns a tiktoken.Encoding."""
    vocab = [bytes([i]) for i in range(256)]
    rank = {b: i for i, b in enumerate(vocab)}
    word_counts = Counter(re.findall(PAT_STR, text))
    words = [list(w.encode("utf-8")) for w in word_counts]    # each word as a list of token ids
    counts = list(word_counts.values())
    pair_count, pair_words = Counter(), defaultdict(set)
    for wi, w in enumerate(words):
        for pair in zip(w, w[1:]):
            pair_count[pair] += counts[wi]
            pair_words[pair].add(wi)
    heap = [(-c, tuple(-t for t in p), p) for p, c in pair_count.items()]
    heapq.heapify(heap)
    while len(vocab) < vocab_size - 1 and heap:
        neg, _, pair = heapq.heappop(heap)
        if pair_count.get(pair, 0) != -neg or -neg == 0:
            continue  # a stale heap entry: this pair's count changed since it was pushed
        merged = vocab[pair[0]] + vocab[pair[1]]
        if merged not in rank:  # two merge paths can spell the same bytes: one token for both
            rank[merged] = len(vocab)
            vocab.append(merged)
        new_id, changed = rank[merged], set()
        for wi in list(pair_words[pair]):
            w, c = words[wi], counts[wi]
            for p in zip(w, w[1:]):
                pair_count[p] -= c
                changed.add(p)
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == pair:
                    out.append(new_id)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            words[wi] = out
            for p in zip(out, out[1:]):
                pair_count[p] += c
                pair_words[p].add(wi)
                changed.add(p)
        del pair_words[pair]
        pair_count.pop(pair, None)
        for p in changed:
            if pair_count.get(p, 0) > 0:
                heapq.heappush(heap, (-pair_count[p], tuple(-t for t in p), p))
    return make_encoding("vcb-bpe", PAT_STR, vocab)


def make_encoding(name, pat_str, vocab):
    """vocab: list of token byte strings in rank order; <|endoftext|> gets the next id."""
    return tiktoken.Encoding(name=name, pat_str=pat_str,
                             mergeable_ranks={b: i for i, b in enumerate(vocab)},
                             special_tokens={EOT: len(vocab)})


def fingerprint(enc):
    """A short hash of what a tokenizer does (its split pattern, tokens and special tokens): two
    tokenizers with the same number of tokens but other merges get different fingerprints, so a
    checkpoint can say which tokenizer its embeddings belong to."""
    h = hashlib.sha256(enc._pat_str.encode())
    for token, rank in sorted(enc._mergeable_ranks.items(), key=lambda kv: kv[1]):
        h.update(b"%d:%s;" % (rank, base64.b64encode(token)))
    for token, rank in sorted(enc._special_tokens.items()):
        h.update(f"{token}={rank};".encode())
    return h.hexdigest()[:16]


def save_tokenizer(enc, path):
    """Our own rank file: JSON with the pattern and the tokens' bytes in rank order (base64). Later
    stages load this file, so even --tokenizer=gpt2 reads GPT-2's files only in the data stage."""
    ranks = sorted(enc._mergeable_ranks.items(), key=lambda kv: kv[1])
    write_json(path, {"format": "vcb-tokenizer-1", "name": enc.name, "pat_str": enc._pat_str,
                      "tokens": [base64.b64encode(b).decode("ascii") for b, _ in ranks]})


def load_tokenizer(path):
    """Parse a rank file written by save_tokenizer (a run's tokenizer.json); a missing or corrupt one
    is a DataError that says why."""
    if not os.path.exists(path):
        raise DataError(f"{path}: missing; run --stage=data first")
    spec = read_json(path)
    if field(spec, "format", str, path) != "vcb-tokenizer-1":
        raise DataError(f"{path}: field 'format' is {shown(spec['format'])}, not a tokenizer file of this project (vcb-tokenizer-1)")
    name, pat_str = field(spec, "name", str, path), field(spec, "pat_str", str, path)
    vocab = []
    for k, token in enumerate(field(spec, "tokens", list, path, items=str)):
        try:
            vocab.append(base64.b64decode(token, validate=True))
        except ValueError:
            raise DataError(f"{path}: field 'tokens[{k}]' is not base64") from None
    if len(set(vocab)) != len(vocab) or not {bytes([i]) for i in range(256)} <= set(vocab):
        raise DataError(f"{path}: field 'tokens': every single byte must be a token and no token may repeat")
    try:
        return make_encoding(name, pat_str, vocab)
    except ValueError as e:  # tiktoken's regex engine refuses the pattern
        raise DataError(f"{path}: field 'pat_str' is not a pattern tiktoken can use ({str(e)[:120]})") from None


# GPT-2's tokenizer, from the two files OpenAI published with GPT-2 (python -m tools.prepare gpt2 puts them
# beside the weights). The split pattern is tiktoken 0.14's for its "gpt2" encoding: the same splits as
# GPT-2's original pattern, written to run faster, so a run's tokenizer.json matches tiktoken's own.
GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
GPT2_FILES = ("vocab.bpe", "encoder.json")


def gpt2_alphabet():
    """How GPT-2's files spell bytes: every token is a string of one character per byte, the printable
    Latin-1 bytes other than space as themselves and the 68 others as chr(256), chr(257), ... in byte
    order, so that no token holds whitespace or control characters. Returns ({character: byte}, the bytes
    in the order of their ranks: the printable ones first)."""
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + k): b for k, b in enumerate(others)}}, printable + others


def gpt2_tokenizer(folder):
    """GPT-2's tokenizer as a tiktoken.Encoding, built from folder/vocab.bpe and folder/encoder.json
    (read_gpt2_files). Without them, tiktoken's own cache is used if it holds GPT-2's files; it is
    never asked to download, so offline this fails at once with a line saying what to provide."""
    if all(os.path.exists(os.path.join(folder, name)) for name in GPT2_FILES):
        return read_gpt2_files(folder)
    import tiktoken.load

    def no_download(url):
        raise DataError(f"--tokenizer=gpt2: {os.path.join(folder, 'vocab.bpe')} and encoder.json are missing (and "
                        f"tiktoken's cache has no copy): run python -m tools.prepare gpt2, which puts them beside the "
                        f"weights in gpt2/, or copy GPT-2's two files into {folder}")

    download, tiktoken.load.read_file = tiktoken.load.read_file, no_download
    try:
        return tiktoken.get_encoding("gpt2")
    finally:
        tiktoken.load.read_file = download


def read_gpt2_files(folder):
    """The Encoding of GPT-2's files: vocab.bpe lists the merges in priority order after a version line,
    each as two tokens; the 256 single bytes take ranks 0-255 in the alphabet's order (gpt2_alphabet),
    the k-th merge makes the token of rank 256 + k, and <|endoftext|> comes last. encoder.json must give
    every token the same id, as tiktoken's own loader requires; anything else is a DataError naming the
    file and line."""
    bpe_file, json_file = (os.path.join(folder, name) for name in GPT2_FILES)
    chars, order = gpt2_alphabet()

    def spelled(text, where):
        try:
            return bytes(chars[c] for c in text)
        except KeyError as e:
            raise DataError(f"{where}: {e.args[0]!r} is not a character of GPT-2's byte alphabet") from None

    ranks = {bytes([b]): rank for rank, b in enumerate(order)}
    for n, line in text_lines(bpe_file):
        if isinstance(line, DataError):
            raise line
        if (n == 1 and line.startswith("#version")) or not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise DataError(f"{bpe_file}:{n}: expected a merge of two tokens, got {shown(line.strip())}")
        token = spelled(parts[0], f"{bpe_file}:{n}") + spelled(parts[1], f"{bpe_file}:{n}")
        if token in ranks:
            raise DataError(f"{bpe_file}:{n}: the merge {shown(line.strip())} makes a token an earlier line made")
        ranks[token] = len(ranks)
    ids = read_json(json_file)
    eot = ids.pop(EOT, len(ranks))
    ids.pop("<|startoftext|>", None)
    for text, rank in ids.items():
        token = spelled(text, json_file)
        if type(rank) is not int or ranks.get(token) != rank:
            raise DataError(f"{json_file}: token {shown(text)} has id {shown(rank)}, but vocab.bpe gives it "
                            f"{ranks.get(token, 'none')}: the two files are not one tokenizer")
    if len(ids) != len(ranks) or eot != len(ranks):
        raise DataError(f"{json_file}: {len(ids)} tokens and <|endoftext|> {shown(eot)}, but vocab.bpe makes "
                        f"{len(ranks)} tokens before <|endoftext|>: the two files are not one tokenizer")
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PAT_STR, mergeable_ranks=ranks, special_tokens={EOT: eot})


def write_gpt2_files(enc, folder):
    """enc (an Encoding with <|endoftext|> last) as GPT-2's two files in folder, which read_gpt2_files
    reads back: made-up tokenizers in GPT-2's layout for the tests and the rehearsal. Single bytes take
    the ranks of the alphabet's order, which renumbers the ids but splits text the same way (BPE merges
    by the ranks of longer tokens alone); each longer token is written as a merge of two earlier ones."""
    chars, order = gpt2_alphabet()
    spell = {b: c for c, b in chars.items()}
    text = lambda token: "".join(spell[b] for b in token)  # noqa: E731
    ranks = {bytes([b]): rank for rank, b in enumerate(order)}
    merges = []
    for token in sorted((t for t in enc._mergeable_ranks if len(t) > 1), key=enc._mergeable_ranks.get):
        k = next(k for k in range(1, len(token)) if token[:k] in ranks and token[k:] in ranks)
        merges.append(f"{text(token[:k])} {text(token[k:])}")
        ranks[token] = len(ranks)
    write_text(os.path.join(folder, "vocab.bpe"), "#version: 0.2\n" + "".join(m + "\n" for m in merges))
    write_json(os.path.join(folder, "encoder.json"), {**{text(t): r for t, r in ranks.items()}, EOT: len(ranks)})


# -----------------------------------------------------------------------------
# sequences: what the models read, as token ids

def encode_group(enc, prompt, responses):
    """A prompt and its responses as token ids: (<|endoftext|> + prompt, [response + <|endoftext|>, ...]).
    User text is encoded with encode_ordinary, so a literal <|endoftext|> in the data stays text."""
    return [enc.eot_token] + enc.encode_ordinary(prompt), [enc.encode_ordinary(r) + [enc.eot_token] for r in responses]


def fit(prompt, responses, block_size):
    """Cut a group to block_size: the prompt from the left (its first token, <|endoftext|>, stays) to
    leave room for its longest response, a response that alone does not fit from the right. Returns
    (prompt, responses, how many sequences were cut)."""
    keep = max(block_size - max(len(r) for r in responses), 2)  # <|endoftext|> and one prompt token
    cut = 0
    if len(prompt) > keep:
        prompt, cut = prompt[:1] + prompt[len(prompt) - keep + 1:], len(responses)
    room = block_size - len(prompt)
    return prompt, [r[:room] for r in responses], max(cut, sum(len(r) > room for r in responses))


def cut_note(what, groups, block_size):
    """A line for the log when some of these groups' sequences are longer than block_size, else None."""
    cut, total = sum(fit(p, rs, block_size)[2] for p, rs in groups), sum(len(rs) for _, rs in groups)
    return (f"{what}: {cut} of {total} sequences were longer than block_size={block_size}; prompts were cut from "
            f"the left (responses from the right where they alone did not fit)") if cut else None


def encode_prompt(enc, prompt, max_len):
    """<|endoftext|> + prompt as token ids for generation, at most max_len of them: a longer prompt
    loses tokens from the left after the <|endoftext|>, which stays first, as in every training
    sequence (fit), so the model never sees a context it was not trained on."""
    ids = enc.encode_ordinary(prompt)
    return [enc.eot_token] + ids[max(0, len(ids) - (max_len - 1)):]


# -----------------------------------------------------------------------------
# the task's files: one JSON object per line, the usual preference-data convention

SCHEMAS = {"sft": {"prompt": str, "response": str},
           "prefs": {"prompt": str, "chosen": str, "rejected": str},
           "align_prompts": {"prompt": str}, "eval_prompts": {"prompt": str}, "ood_prompts": {"prompt": str},
           "val_prompts": {"prompt": str},
           # written by the sample stage, or brought by the user: n scored candidates per prompt
           "candidates": {"prompt": str, "responses": (list, str), "rewards": (list, float), "ref_logps": (list, float)}}
TASK_FILES = ["sft", "prefs", "align_prompts", "eval_prompts", "ood_prompts", "val_prompts"]  # what the data stage writes
OPTIONAL_FILES = ["ood_prompts", "val_prompts"]  # out-of-distribution and validation prompts: not every task has them


def read_task_file(out_dir, name):
    """A file the data stage wrote into out_dir/data; the out-of-distribution and validation prompts
    are optional."""
    file = os.path.join(out_dir, "data", f"{name}.jsonl")
    if name in OPTIONAL_FILES and not os.path.exists(file):
        return []
    if not os.path.exists(file):
        raise DataError(f"{file}: missing; run --stage=data first")
    return read_jsonl(file, SCHEMAS[name])


@dataclass
class Candidates:
    """The scored candidates, ready for alignment: groups[i] is prompt i with its n candidates as
    token ids (encode_group); ref_logps and rewards are (B, n) float32."""
    groups: list
    ref_logps: torch.Tensor
    rewards: torch.Tensor


def read_candidates(file, enc):
    """A candidates file (the sample stage's, or your own): n responses per prompt, each with its
    reward and its log-probability under the reference model. Every prompt needs the same n >= 2,
    and every number must be finite in float32."""
    if not os.path.exists(file):
        raise DataError(f"{file}: missing; run --stage=sample first")
    records = read_jsonl(file, SCHEMAS["candidates"])
    n = len(records[0]["responses"])
    for line, r in enumerate(records, 1):
        if len(r["responses"]) < 2:
            raise DataError(f"{file}:{line}: field 'responses' has {len(r['responses'])} candidate; VCB and the baselines need at least 2")
        for key in ("rewards", "ref_logps"):
            if len(r[key]) != len(r["responses"]):
                raise DataError(f"{file}:{line}: field '{key}' has {len(r[key])} values for {len(r['responses'])} responses")
        if len(r["responses"]) != n:
            raise DataError(f"{file}:{line}: field 'responses' has {len(r['responses'])} candidates but line 1 has {n}; "
                            f"every prompt needs the same number")
    ref_logps, rewards = torch.tensor([r["ref_logps"] for r in records]), torch.tensor([r["rewards"] for r in records])
    sigma = rewards.std(dim=-1, unbiased=False)[:, None]  # each prompt's spread, as vcb.reward_sigma computes it
    for key, values in (("ref_logps", ref_logps), ("rewards", rewards), ("rewards", sigma)):
        bad = (~values.isfinite()).any(-1).nonzero()
        if len(bad):  # finite in JSON's float64, but not in float32 (or their spread is not)
            raise DataError(f"{file}:{int(bad[0]) + 1}: field '{key}' has values too large for float32 (|value| < 1e38)")
    return Candidates([encode_group(enc, r["prompt"], r["responses"]) for r in records], ref_logps, rewards)
