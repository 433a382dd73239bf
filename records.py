"""
records.py: what made the files in a run's folder, so that finished work is skipped and stale work
is never used. stages.json records, for every task (a stage, or one policy of an experiment), the
settings it ran with and a content hash of each file it read and wrote; a task is up to date while
all of these match. Several processes (experiments.py's workers) share the records, the training
curves and the scored samples kept beside each policy, under a file lock.

Nothing here trains or evaluates anything; train.py and experiments.py ask it what to do.
"""
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import stat
from dataclasses import dataclass

import data
from data import DataError
from config import STAGES, ConfigError, align_settings, method_list, stage_settings
from runtime import barrier, log, note_progress, path


@contextlib.contextmanager
def locked(file):
    """An exclusive lock on file + '.lock' for the block: several processes (experiments.py's workers)
    may read, change and write the same small file."""
    os.makedirs(os.path.dirname(os.path.abspath(file)), exist_ok=True)
    with open(f"{file}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@dataclass
class Task:
    """A piece of work whose outputs stages.json records with what made them: the settings, and a
    fingerprint (content hash) of every file it read and wrote. It is up to date while all of these
    still match. Otherwise it runs, and its record is dropped before it writes anything, so a task
    that fails part-way never leaves outputs that look finished (each file is written whole, or the
    old one stays)."""
    name: str        # its key in stages.json: "sft", "align-vcb", "sweep-vcb-beta1-seed0", ...
    stage: str       # the pipeline stage it belongs to: which earlier stages' outputs it builds on
    settings: dict   # config.stage_settings(...), plus anything else its outputs depend on
    inputs: list     # files it reads
    outputs: list    # files it writes: the first is the model, when it trains one
    optional: list = dataclasses.field(default_factory=list)  # files it may write, recorded when it has
    snapshots: dict = dataclasses.field(default_factory=dict)  # {step: file}: the model as it was then (experiments)


_hashes = {}  # (path, size, mtime) -> content hash: each file is read once per process


def file_hash(file):
    """sha256 of a file's content (its first 16 hex digits), None when it does not exist. Only a
    regular file is read: a pipe or a device (a data file that is a FIFO, /dev/zero) would never end."""
    try:
        st = os.stat(file)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    key = (os.path.abspath(file), st.st_size, st.st_mtime_ns)
    if key not in _hashes:
        h = hashlib.sha256()
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _hashes[key] = h.hexdigest()[:16]
    return _hashes[key]


def record_name(cfg, file):
    """A file's name in the records: relative to out_dir when inside it, so that a copied folder keeps
    its records (os.path.join(out_dir, name) finds the file either way)."""
    return os.path.abspath(file).removeprefix(os.path.abspath(cfg.out_dir) + os.sep)


def fingerprints(cfg, files):
    """{record name: content hash} of files."""
    return {record_name(cfg, f): file_hash(f) for f in files}


def read_records(cfg):
    """stages.json, {task name: record}; a missing or unreadable file, or a record that is not one,
    counts as nothing done (the work is redone, never taken for finished)."""
    try:
        records = data.read_json(path(cfg, "stages.json"))
    except DataError:
        return {}
    keys = {"stage", "settings", "inputs", "outputs"}
    return {k: v for k, v in records.items() if isinstance(v, dict) and keys <= set(v)}


def update_records(cfg, env, change):
    """change(records) applied to stages.json under a file lock: experiments.py runs tasks in several
    processes at once, and a read-modify-write without the lock could drop another's record."""
    if env.master:
        with locked(path(cfg, "stages.json")):
            records = read_records(cfg)
            change(records)
            data.write_json(path(cfg, "stages.json"), records)


def up_to_date(cfg, env, task):
    """True (and says so) when the task's outputs exist and were made with these settings from these
    inputs, unless --force; otherwise the task will run. Either way the outputs of earlier stages
    that it builds on must have been made with this run's settings and from the files now in the
    folder, or a stage run alone would silently build on stale ones."""
    records = read_records(cfg)
    now = fingerprints(cfg, task.inputs)
    for name, rec in records.items():  # a producer of an input whose own inputs have changed since
        built_on = [f for f, h in now.items() if h is not None and rec["outputs"].get(f) == h and name != task.name]
        stale = [f for f, h in rec["inputs"].items() if built_on and file_hash(os.path.join(cfg.out_dir, f)) != h]
        if stale:
            raise ConfigError(f"{name} outputs in {cfg.out_dir} ({built_on[0]}) were made from other inputs ({stale[0]} has "
                              f"changed since): run --stage={rec['stage']} first (or every stage), or use another --out_dir")
    rec = records.get(task.name)
    if not cfg.force and rec is not None and rec["settings"] == task.settings and rec["inputs"] == now:
        outputs = {f: file_hash(os.path.join(cfg.out_dir, f)) for f in rec["outputs"]}  # with the optional ones it wrote
        if outputs == rec["outputs"] and {record_name(cfg, f) for f in task.outputs} <= outputs.keys():
            log(env, f"{task.name}: up to date")
            return True
    earlier = [(s, stage_settings(cfg, s)) for s in STAGES[:STAGES.index(task.stage)] if s != "align"]
    if task.stage == "eval":
        earlier += [(f"align-{m}", align_settings(cfg, m, cfg.seed)) for m in method_list(cfg)]
    for name, want in earlier:
        have = records.get(name, {}).get("settings")
        if have is not None and have != want:
            diff = ", ".join(f"{k}={have.get(k)} (now {want[k]})" for k in want if have.get(k) != want[k])
            raise ConfigError(f"{name} outputs in {cfg.out_dir} were made with {diff}: run --stage={name.split('-')[0]} "
                              f"first (or every stage), or use another --out_dir")
    if task.name in records:  # about to write: until it is done, nothing may take its outputs for finished
        update_records(cfg, env, lambda records: records.pop(task.name, None))
    barrier(env)
    note_progress(task.name)
    return False


def mark_done(cfg, env, task):
    outputs = task.outputs + [f for f in task.optional if os.path.exists(f)]
    record = {"stage": task.stage, "settings": task.settings, "inputs": fingerprints(cfg, task.inputs),
              "outputs": fingerprints(cfg, outputs)}
    update_records(cfg, env, lambda records: records.update({task.name: record}))


def kept(file, key, compute, env):
    """compute() -> a JSON value, kept in `file` with `key` (what it was computed from) and read back
    while the key is the same: the scored samples of a policy are computed once however many tables
    read them. Only the main process writes (every process has the same gathered result)."""
    try:
        found = data.read_json(file)
        if found.get("key") == key and "value" in found:
            return found["value"]
    except DataError:
        pass  # none yet, or unreadable: compute it again
    value = compute()
    if env.master:
        data.write_json(file, {"key": key, "value": value})
    return value


# -----------------------------------------------------------------------------
# training curves: curves.jsonl, one line per step of every training task (report.plot_curves draws them)

def read_curves(file):
    """The records of a curves file; a line cut short by a crash is skipped."""
    out = []
    for _, line in data.text_lines(file) if os.path.exists(file) else []:
        try:
            out.append(data.parse_json(line, file) if isinstance(line, str) else None)  # not UTF-8: a DataError
        except DataError:
            pass
    return [r for r in out if isinstance(r, dict) and "task" in r and "step" in r]


def curves_from(file, task, step):
    """Keep the task's records up to `step` and every other task's: a resumed run continues its curve
    without repeating steps, a fresh one (step 0) starts it anew. Rewriting also drops a torn line."""
    with locked(file):  # tasks of experiments.py's workers share the file
        if os.path.exists(file):
            data.write_jsonl(file, [r for r in read_curves(file) if r["task"] != task or r["step"] <= step])


def curves_append(file, *rows):
    with locked(file), open(file, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(data.finite(r), allow_nan=False) + "\n" for r in rows))
