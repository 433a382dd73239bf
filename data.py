"""
data.py: the tokenizer, the data files and the sequences the models read.

- Tokenizer: a byte-level BPE the project trains itself (deterministic, seconds on 1 MB), served
  through tiktoken.Encoding and saved as a JSON rank file that we write and parse ourselves. A plain
  256-byte encoding for tests. Every tokenizer here is a tiktoken.Encoding with <|endoftext|>.
- Files: JSON lines, read with a one-line error naming the file, line and field; every output is
  written to a temporary file and renamed into place, so a crash never leaves half a file.
- Sequences: <|endoftext|> + prompt + response + <|endoftext|>, right-padded into batches.
The task's records come from reviews.py (the built-in task, generated) or corpora.py (the paper's
data sets and your own files); the batches the models read are packed by packing.py.
"""
import base64
import contextlib
import gzip
import hashlib
import heapq
import json
import math
import os
import re
import stat
import tempfile
import zlib
from collections import Counter, defaultdict

import tiktoken
import torch

EOT = "<|endoftext|>"
# Pre-tokenisation pattern (GPT-2's, written with classes that Python's re and tiktoken's regex engine
# read the same way, so training and encoding split text alike): contractions, letters, digits,
# other symbols, whitespace. Together they match every character, so decode(encode(s)) == s.
PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+"""


# -----------------------------------------------------------------------------
# files: one-line errors, atomic writes

def one_line(text):
    """text with each character that would break its line or fail to print (a newline, a lone
    surrogate) escaped: error messages quote paths, options and records as they are."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in str(text))


class DataError(ValueError):
    """Bad input, with a message of one line that names the file, line and field."""
    def __init__(self, message):
        super().__init__(one_line(message))


@contextlib.contextmanager
def atomic_path(path):
    """Yields a temporary path beside `path`; renamed onto `path` only if the block succeeds."""
    path = str(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        yield tmp
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one, never half
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def finite(obj):
    """obj with every NaN or infinite float replaced by None (JSON's null): strict JSON parsers
    reject the NaN and Infinity that Python's json module writes by default."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def write_jsonl(path, records):
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(finite(r), ensure_ascii=False, allow_nan=False) + "\n")


def write_text(path, text):
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def write_json(path, obj):
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(finite(obj), f, indent=2, ensure_ascii=False, allow_nan=False)
        f.write("\n")


def check_file(path):
    """A DataError unless path is a regular file: a folder cannot be read as one, a pipe would wait
    forever and a device such as /dev/zero never ends."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e.strerror})") from None
    if stat.S_ISDIR(mode):
        raise DataError(f"{path}: is a folder, not a file")
    if not stat.S_ISREG(mode):
        raise DataError(f"{path}: not a regular file (a pipe, socket or device); refused")


def open_text(path):
    """Open a regular text file, gunzipping *.gz; anything else is a DataError."""
    check_file(path)
    return gzip.open(path, "rt", encoding="utf-8") if str(path).endswith(".gz") else open(path, encoding="utf-8-sig")


def text_lines(path):
    """(line number, text) of each line of a regular file (gunzipped if *.gz), decoded one line at a
    time so that one bad line spoils nothing else: a line that is not UTF-8 comes as a DataError in
    place of its text. A BOM is dropped, CRLF line ends are left to the JSON parser (whitespace).
    A truncated or corrupt gzip stream raises a DataError after the lines before it."""
    check_file(path)
    n = 0
    try:
        with (gzip.open(path, "rb") if str(path).endswith(".gz") else open(path, "rb")) as f:
            for n, raw in enumerate(f, 1):
                try:
                    yield n, raw.decode("utf-8-sig" if n == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    yield n, DataError(f"{path}:{n}: not UTF-8 text ({e.reason} at byte {e.start})")
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}: unreadable after line {n}: truncated or not what its name says "
                        f"({type(e).__name__}: {e})") from None


def parse_json(text, where):
    """A JSON value from text, or a DataError saying why not. Every JSON reader passes here: beyond
    malformed text, Python's parser also fails on nesting deeper than its recursion limit and on an
    integer of more than 4300 digits; each is one line naming `where`."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise DataError(f"{where}: JSON nested too deeply to read") from None
    except ValueError as e:  # "Exceeds the limit (4300 digits) for integer string conversion"
        raise DataError(f"{where}: unreadable JSON ({str(e)[:120]})") from None


def parse_json_line(line, where):
    """One JSON-lines record (a dict), or a DataError saying why not."""
    if not line.strip():
        raise DataError(f"{where}: empty line")
    return json_value(line, where, dict)


def json_value(text, where, kind=dict):
    """The JSON text's value, of `kind` (object: any) and valid Unicode throughout, or a DataError."""
    value = parse_json(text, where)
    if not isinstance(value, kind):
        raise DataError(f"{where}: expected a JSON {'object' if kind is dict else json_type(kind())}, got {json_type(value)}")
    bad = not_unicode(value)
    if bad:
        raise DataError(f"{where}: field '{bad}' is not valid Unicode text (a lone surrogate such as \\ud800)")
    return value


def read_json(path, kind=dict):
    """A whole JSON file (a tokenizer, a preset, a run's config.json, stages.json), read like a
    JSON line: a regular UTF-8 file holding one value of `kind` (object: any), or a DataError
    naming the file."""
    check_file(path)
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e.strerror})") from None
    return json_value(text, path, kind)


def read_jsonl(path, schema=None):
    """Read a JSON-lines file into a list of dicts, strictly. schema {field: kind} checks each record's
    fields with field() (kind (list, item kind) checks a list and its items). Any bad line is a
    DataError naming the file, line and field."""
    records = []
    for n, line in text_lines(path):
        if isinstance(line, DataError):
            raise line
        rec = parse_json_line(line, f"{path}:{n}")
        for name, kind in (schema or {}).items():
            kind, items = kind if isinstance(kind, tuple) else (kind, None)
            field(rec, name, kind, f"{path}:{n}", items=items)
        records.append(rec)
    if not records:
        raise DataError(f"{path}: empty file, no records")
    return records


def valid_unicode(text):
    """False for a string that cannot be written as UTF-8: JSON's \\ud800 escapes decode to lone
    surrogates, which scraped data does contain, and which no tokenizer or file can take."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def not_unicode(value, name=""):
    """The name of the first string inside a decoded JSON value that is not valid Unicode
    ('prompt', 'summaries[1].text'), or None: every reader refuses or skips such a record whole."""
    if isinstance(value, str):
        return None if valid_unicode(value) else name
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        bad = not_unicode(v, f"{name}[{k}]" if isinstance(k, int) else f"{name}.{k}" if name else k)
        if bad is not None:
            return bad
    return None


# -----------------------------------------------------------------------------
# the typed field accessor: every reader of a record, a spec or a checkpoint reads its fields here

FLOAT32_MAX = 3.4028234663852886e38  # every number read goes into float32 tensors


def json_type(value):
    """A decoded value's type as a reader names it: str, int, float, bool, list, dict, null."""
    return "null" if value is None else type(value).__name__


def field(obj, name, kind, where, *, empty=False, items=None, lo=None, hi=None):
    """The field `name` of a decoded JSON object (or a checkpoint's dict), checked, or a DataError
    '{where}: field NAME ...'. name walks into the value: 'info.title', 'summaries[1].text'. kind:
    str (non-empty unless empty=True), int (a whole number, not a bool or a float, in [lo, hi]),
    float (an int or float, finite in float32, in [lo, hi]), bool, list (items: the kind of each item,
    whose strings may be empty: a sampled response can be) or dict. Returns the value."""
    value, at = obj, ""
    for key in re.findall(r"[^.[\]]+|\[\d+\]", name):
        index = key[0] == "["
        if index and not isinstance(value, list) or not index and not isinstance(value, dict):
            raise DataError(f"{where}: field '{at}' should be {'list' if index else 'dict'}, got {json_type(value)}")
        at = f"{at}{key}" if index else f"{at}.{key}" if at else key
        if index and int(key[1:-1]) >= len(value) or not index and key not in value:
            raise DataError(f"{where}: missing field '{at}'")
        value = value[int(key[1:-1])] if index else value[key]
    check_value(value, name, kind, where, empty, lo, hi)
    for k, v in enumerate(value if items is not None else ()):
        check_value(v, f"{name}[{k}]", items, where, True, lo, hi)
    return value


def check_value(value, name, kind, where, empty=False, lo=None, hi=None):
    ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        ok = True  # JSON writes 1.0 as 1
    if not ok:
        raise DataError(f"{where}: field '{name}' should be {kind.__name__}, got {json_type(value)}")
    if kind is str and not empty and not value.strip():
        raise DataError(f"{where}: field '{name}' is empty")
    if kind is float and not abs(value) <= FLOAT32_MAX:  # False for NaN too; exact for a huge int
        raise DataError(f"{where}: field '{name}' is {shown(value)}, not a finite float32 number (|value| < 3.4e38)")
    if kind in (int, float) and (lo is not None and value < lo or hi is not None and value > hi):
        raise DataError(f"{where}: field '{name}' is {shown(value)}, expected {lo} to {hi}")


def shown(value, width=40):
    """A value as an error message quotes it: its JSON text, cut to width (an integer may have
    thousands of digits)."""
    if isinstance(value, int) and value.bit_length() > 128:  # str() refuses past 4300 digits
        return f"an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits"
    text = str(value) if isinstance(value, (int, float)) else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= width else text[:width - 3] + "..."


# the pipeline's files: one JSON object per line, the usual preference-data convention
SCHEMAS = {"sft": {"prompt": str, "response": str},
           "prefs": {"prompt": str, "chosen": str, "rejected": str},
           "align_prompts": {"prompt": str}, "eval_prompts": {"prompt": str}, "ood_prompts": {"prompt": str},
           # written by the sample stage, or brought by the user: n scored candidates per prompt
           "candidates": {"prompt": str, "responses": (list, str), "rewards": (list, float), "ref_logps": (list, float)}}
TASK_FILES = ["sft", "prefs", "align_prompts", "eval_prompts", "ood_prompts"]  # what the data stage writes


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
    stages load this file, so even --tokenizer=gpt2 needs tiktoken's cache only in the data stage."""
    ranks = sorted(enc._mergeable_ranks.items(), key=lambda kv: kv[1])
    write_json(path, {"format": "vcb-tokenizer-1", "name": enc.name, "pat_str": enc._pat_str,
                      "tokens": [base64.b64encode(b).decode("ascii") for b, _ in ranks]})


def load_tokenizer(path):
    """Parse a rank file written by save_tokenizer; a corrupt one is a DataError that says why."""
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


def gpt2_tokenizer():
    """tiktoken's GPT-2 encoding, from tiktoken's local cache only. tiktoken downloads its files on
    first use; here the download function is swapped for one that fails at once, so offline this
    never hangs and says what to provide."""
    import tiktoken.load

    def no_download(url):
        cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR") or \
            os.path.join(tempfile.gettempdir(), "data-gym-cache")
        raise DataError(f"--tokenizer=gpt2: {url.rsplit('/', 1)[-1]} is not in tiktoken's cache {cache}; on a machine "
                        f"with network run TIKTOKEN_CACHE_DIR=gpt2-cache python -c \"import tiktoken; "
                        f"tiktoken.get_encoding('gpt2')\", copy gpt2-cache here and set TIKTOKEN_CACHE_DIR to it")

    download, tiktoken.load.read_file = tiktoken.load.read_file, no_download
    try:
        return tiktoken.get_encoding("gpt2")
    finally:
        tiktoken.load.read_file = download


# -----------------------------------------------------------------------------
# sequences and batches

def encode_example(enc, prompt, response, block_size):
    """<|endoftext|> + prompt + response + <|endoftext|> as token ids, and the index of the first
    response token. A sequence longer than block_size loses prompt tokens from the left (the start
    of the prompt matters least for what comes next); a response that alone does not fit is cut.
    Returns (ids, start, truncated)."""
    eot = enc.eot_token
    p = enc.encode_ordinary(prompt)
    r = enc.encode_ordinary(response) + [eot]
    keep_p = max(block_size - 1 - len(r), 1)  # at least one prompt token stays
    truncated = len(p) > keep_p or 1 + min(len(p), keep_p) + len(r) > block_size
    p = p[-keep_p:]
    ids = ([eot] + p + r)[:block_size]
    return ids, 1 + len(p), truncated


def collate(examples, pad_id):
    """examples: list of (ids, start) -> idx (B, T) right-padded, mask (B, T) 1 on response tokens."""
    T = max(len(ids) for ids, _ in examples)
    idx = torch.full((len(examples), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), T), dtype=torch.bool)
    for b, (ids, start) in enumerate(examples):
        idx[b, :len(ids)] = torch.tensor(ids)
        mask[b, start:len(ids)] = True
    return idx, mask


def encode_prompt(enc, prompt, max_len):
    """<|endoftext|> + prompt as token ids for generation, at most max_len of them: a longer prompt
    loses tokens from the left after the <|endoftext|>, which stays first, as in every training
    sequence (encode_example, packing.fit), so the model never sees a context it was not trained on."""
    ids = enc.encode_ordinary(prompt)
    return [enc.eot_token] + ids[max(0, len(ids) - (max_len - 1)):]
