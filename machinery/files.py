"""
machinery/files.py: every file the project reads or writes passes here. Writes are atomic (a
temporary file renamed into place: a crash leaves the old file or none, never half of one); reads
of JSON and JSON lines are strict, and anything wrong is a DataError of one line naming the file,
the line and the field.

- one_line, DataError: the error a bad file ends with (runtime.command prints it, exit status 2).
- WriteError, refusal, writing, make_folder, remove: the file system's refusals (out of space,
  read-only, permission denied, a file where a folder should be), in one place: one line naming the
  path and what to do, whatever was writing.
- atomic_path, write_jsonl, write_json, write_text: whole files or nothing; resumable_path: the
  same for a download that may resume.
- check_file, text_lines: regular files only, one line at a time (a line that is not UTF-8 spoils
  nothing else; a truncated .gz gives the lines before the cut).
- parse_json, json_value, read_json, read_jsonl: the one JSON parser, and what it refuses.
- field, check_value: the typed accessor every reader of a record, a spec or a checkpoint uses.
"""
import contextlib
import errno
import gzip
import json
import math
import os
import re
import stat
import zlib


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


# -----------------------------------------------------------------------------
# the file system's refusals, in one place

class WriteError(DataError):
    """The file system refused a write: out of space, read-only, permission denied, a file where a
    folder should be. One line naming the path and what to do. Every write is atomic, so nothing was
    left half-written, and the same command run again after the fix goes on from where it stopped."""


WHAT_TO_DO = {  # errno -> what the user can do about it
    errno.ENOSPC: "the device is full: free some space there or use another --out_dir",
    errno.EDQUOT: "the disk quota is used up: free some space there or use another --out_dir",
    errno.EROFS: "the file system is read-only: mount it writable or use another --out_dir",
    errno.EACCES: "permission denied: make the folder writable for this user or use another --out_dir",
    errno.EPERM: "permission denied: make the folder writable for this user or use another --out_dir",
    errno.ENOTDIR: "a file is in the way where a folder should be: move it or use another --out_dir",
    errno.EEXIST: "a file is in the way where a folder should be: move it or use another --out_dir",
    errno.EISDIR: "a folder is in the way where a file should be: move it or use another --out_dir",
    errno.ENAMETOOLONG: "the path is too long for the file system: use a shorter --out_dir",
    errno.EFBIG: "the file is larger than the file system allows: use another --out_dir",
    errno.EIO: "the device reported an input/output error: check the disk, or use another --out_dir",
}
REFUSALS = set(WHAT_TO_DO)  # the errors runtime.command reports in one line even when no writer named its path


def refusal(path, error, doing="write"):
    """The one-line WriteError for the file system's refusal `error` (an OSError) of `doing` at path."""
    why = error.strerror or type(error).__name__
    what = WHAT_TO_DO.get(error.errno, "fix that or use another --out_dir")
    return WriteError(f"{path}: cannot {doing} it ({why}): {what}; then run the same command again")


@contextlib.contextmanager
def writing(path, doing="write"):
    """The block writes (or creates, or removes) path: an OSError in it becomes refusal(path). Every
    write of the project passes here, so a full disk is the same line whether torch.save, a JSON
    writer, matplotlib, the stage records, the curves or a lock met it."""
    try:
        yield
    except WriteError:
        raise
    except OSError as e:
        raise refusal(path, e, doing) from None


def make_folder(folder):
    """os.makedirs(folder, exist_ok=True), refused in one line."""
    with writing(folder, "create"):
        os.makedirs(folder, exist_ok=True)


def remove(path):
    """Remove a file if it is there, refused in one line."""
    with writing(path, "remove"):
        if os.path.lexists(path):
            os.remove(path)


TEMPORARY = re.compile(r"\.tmp(\d+)$")  # atomic_path's temporaries: <file>.tmp<pid>


@contextlib.contextmanager
def atomic_path(path):
    """Yields a temporary path beside `path`; renamed onto `path` only if the block succeeds. The
    file system's refusals, in the block or in the rename, are one WriteError naming path; the
    temporary is removed (a process killed before that leaves it, and the next run in the folder
    removes it: processes.claim)."""
    path = str(path)
    tmp = f"{path}.tmp{os.getpid()}"
    with writing(path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        try:
            yield tmp
            os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one, never half
        finally:
            with contextlib.suppress(OSError):  # a file system turned read-only keeps it: removed by the next run
                if os.path.exists(tmp):
                    os.remove(tmp)


@contextlib.contextmanager
def resumable_path(path):
    """Yields `path` + '.part', where a download grows; renamed onto `path` only if the block succeeds.
    Unlike atomic_path, a block that fails leaves the part file, so that the next try resumes from it
    (the block removes it itself when what it holds is wrong)."""
    path = str(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    yield f"{path}.part"
    os.replace(f"{path}.part", path)  # atomic: the file is whole or absent


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
