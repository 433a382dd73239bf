"""
machinery/records.py: what made the files in a run's folder, so that finished work is skipped and
stale work is never used. stages.json records, for every task (a stage, or one policy of an
experiment), the settings it ran with and a content hash of each file it read and wrote; a task is up
to date while all of these match.

The settings are derived, not listed: they are the options the task read while it ran
(config.reading), with the device and precision it ran on and what else it names (a method, a
seed). A stage that does not read an option cannot depend on it; one that does is redone when it
changes. Several processes (the experiments' workers) share the records, the training curves and
the results kept beside each policy, under a file lock.
"""
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import stat
from dataclasses import dataclass

from machinery.config import FIELDS, STAGES, ConfigError, note_reads, peek, reading
from machinery.files import DataError, finite, make_folder, parse_json, read_json, text_lines, write_json, write_jsonl, writing
from machinery.runtime import barrier, log, note_progress, path


@contextlib.contextmanager
def locked(file):
    """An exclusive lock on file + '.lock' for the block: several processes (the experiments' workers)
    may read, change and write the same small file."""
    make_folder(os.path.dirname(os.path.abspath(file)))
    with writing(f"{file}.lock"):  # read-only: flock needs no more (a file open for writing keeps a disk from turning read-only)
        lock = os.fdopen(os.open(f"{file}.lock", os.O_RDONLY | os.O_CREAT, 0o644))
    with lock:
        with writing(f"{file}.lock", "lock"):
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@dataclass
class Task:
    """A piece of work whose outputs stages.json records with what made them: the settings it read,
    and a fingerprint (content hash) of every file it read and wrote. It is up to date while all of
    these still match. Otherwise it runs, and its record is dropped before it writes anything, so a
    task that fails part-way never leaves outputs that look finished (each file is written whole, or
    the old one stays)."""
    name: str        # its key in stages.json: "sft", "align-vcb", "sweep-vcb-beta1-seed0", ...
    stage: str       # the pipeline stage it belongs to: which earlier stages' outputs it builds on
    inputs: list     # files it reads
    outputs: list    # files it writes: the first is the model, when it trains one
    extra: dict = dataclasses.field(default_factory=dict)  # what it depends on besides the options: its method, seed, ...
    optional: list = dataclasses.field(default_factory=list)  # files it may write, recorded when it has
    snapshots: dict = dataclasses.field(default_factory=dict)  # {step: file}: the model as it was then (experiments)
    reads: set = None  # the options it has read so far, while it runs


# -----------------------------------------------------------------------------
# settings: what the task read, where it ran, and its own

def settings(cfg, env, task, reads):
    """The record of what a task's outputs depend on: the options in reads with their values, the
    device type and precision it ran with, and the task's own extra settings."""
    return {**{k: peek(cfg, k) for k in sorted(reads)}, "device_type": env.device_type,
            "dtype": str(env.dtype).removeprefix("torch."), **task.extra}


def settings_so_far(cfg, env, task):
    """settings() of what the task has read up to now: a resumable checkpoint keeps them."""
    return settings(cfg, env, task, task.reads or set())


def differences(cfg, env, task, recorded):
    """The settings of a record that this run has otherwise: ['key=recorded (now current)', ...];
    [] when every one is the same. A record that is not a dict of settings differs whole."""
    if not isinstance(recorded, dict):
        return ["its settings are unreadable"]
    now = settings(cfg, env, task, [k for k in recorded if k in FIELDS])
    return [f"{k}={recorded.get(k)} (now {now.get(k)})" for k in dict.fromkeys([*recorded, *now])
            if recorded.get(k, "<none>") != now.get(k, "<none>")]


def same_settings(cfg, env, task, recorded):
    return not differences(cfg, env, task, recorded)


# -----------------------------------------------------------------------------
# files: content hashes and stages.json

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
        records = read_json(path(cfg, "stages.json"))
    except DataError:
        return {}
    keys = {"stage", "settings", "inputs", "outputs"}
    return {k: v for k, v in records.items() if isinstance(v, dict) and keys <= set(v) and isinstance(v["stage"], str)
            and isinstance(v["inputs"], dict) and isinstance(v["outputs"], dict)}


def update_records(cfg, env, change):
    """change(records) applied to stages.json under a file lock: the experiments run tasks in several
    processes at once, and a read-modify-write without the lock could drop another's record."""
    if env.master:
        with locked(path(cfg, "stages.json")):
            records = read_records(cfg)
            change(records)
            write_json(path(cfg, "stages.json"), records)


# -----------------------------------------------------------------------------
# running a task: skipped when up to date, recorded when done

def run(cfg, env, task, work):
    """work() unless the task is up to date; then its record, with the options work() read. Returns
    whether it ran."""
    if up_to_date(cfg, env, task):
        return False
    with reading() as task.reads:
        work()
    mark_done(cfg, env, task)
    task.reads = None
    return True


def up_to_date(cfg, env, task):
    """True (and says so) when the task's outputs exist and were made with these settings from these
    inputs, unless --force; otherwise the task will run (and, when it had run before, says why). Either
    way every input it reads must still be the file its maker wrote (check_inputs), and the outputs of
    earlier stages that it builds on must have been made with this run's settings and from the files
    now in the folder, or a stage run alone would silently build on stale ones."""
    records = read_records(cfg)
    check_inputs(cfg, task.inputs, records, skip=task.name)
    now = fingerprints(cfg, task.inputs)
    for name, rec in records.items():  # a producer of an input whose own inputs have changed since
        built_on = [f for f, h in now.items() if h is not None and rec["outputs"].get(f) == h and name != task.name]
        stale = [f for f, h in rec["inputs"].items() if built_on and file_hash(os.path.join(cfg.out_dir, f)) != h]
        if stale:
            raise ConfigError(f"{name} outputs in {cfg.out_dir} ({built_on[0]}) were made from other inputs ({stale[0]} has "
                              f"changed since): run --stage={rec['stage']} first (or every stage), or use another --out_dir")
    rec = records.get(task.name)
    if not cfg.force and rec is not None:
        why = redo_reason(cfg, env, task, rec, now)
        if why is None:
            log(env, f"{task.name}: up to date")
            return True
        log(env, f"{task.name}: {why}: running it again")
    for earlier in earlier_tasks(cfg, task):
        have = records.get(earlier.name, {}).get("settings")
        diff = differences(cfg, env, earlier, have) if have is not None else []
        if diff:
            raise ConfigError(f"{earlier.name} outputs in {cfg.out_dir} were made with {', '.join(diff)}: run "
                              f"--stage={earlier.stage} first (or every stage), or use another --out_dir")
    if task.name in records:  # about to write: until it is done, nothing may take its outputs for finished
        update_records(cfg, env, lambda records: records.pop(task.name, None))
    barrier(env)
    note_progress(task.name)
    return False


def redo_reason(cfg, env, task, rec, now):
    """Why a task that ran before must run again, in a few words naming what changed (its settings,
    an input, an output); None when it is up to date."""
    diff = differences(cfg, env, task, rec["settings"])
    if diff:
        return f"its settings changed ({diff[0]})"
    changed = [f for f in dict.fromkeys([*rec["inputs"], *now]) if rec["inputs"].get(f) != now.get(f)]
    if changed:
        return f"its input {changed[0]} changed"
    for f, h in rec["outputs"].items():  # with the optional ones it wrote
        now_h = file_hash(os.path.join(cfg.out_dir, f))
        if now_h != h:
            return f"its output {f} {'is missing' if now_h is None else 'changed since it was written'}"
    unrecorded = [f for f in (record_name(cfg, f) for f in task.outputs) if f not in rec["outputs"]]
    return f"its output {unrecorded[0]} is not in its record" if unrecorded else None


def check_inputs(cfg, files, records=None, skip=None):
    """A DataError naming the first of files whose content is not what the task that wrote it
    recorded in stages.json (cut short, a few bytes changed, another file copied over it): a stage
    run alone, an experiment's worker or an evaluation would otherwise use it and end with a wrong
    result. The full command never gets here with one: the task that wrote it runs first, sees its
    output changed and makes it again. records: stages.json as read (default: read now); skip: the
    task under way, whose own record is about to go."""
    records = read_records(cfg) if records is None else records
    for f, h in fingerprints(cfg, files).items():
        for name, rec in records.items():  # a missing file is left to its reader, which says which stage writes it
            if name != skip and h is not None and f in rec["outputs"] and rec["outputs"][f] != h:
                raise DataError(f"{os.path.join(cfg.out_dir, f)}: changed since the {name} task wrote it (its content is not "
                                f"what stages.json recorded): run --stage={rec['stage']} again, or the whole command, to make "
                                f"it again")


def earlier_tasks(cfg, task):
    """The tasks of this run whose outputs the task builds on: the stages before its own (and, for the
    eval stage, this run's policies), with the extra settings each records."""
    from machinery.config import method_list  # the policies the eval stage reads
    earlier = [Task(s, s, [], []) for s in STAGES[:STAGES.index(task.stage)] if s != "align"]
    if task.stage == "eval":
        earlier += [Task(f"align-{m}", "align", [], [], extra={"method": m, "align_seed": peek(cfg, "seed")})
                    for m in method_list(cfg)]
    return earlier


def mark_done(cfg, env, task):
    outputs = task.outputs + [f for f in task.optional if os.path.exists(f)]
    record = {"stage": task.stage, "settings": settings(cfg, env, task, task.reads or set()),
              "inputs": fingerprints(cfg, task.inputs), "outputs": fingerprints(cfg, outputs)}
    update_records(cfg, env, lambda records: records.update({task.name: record}))


def kept(file, key, compute, cfg, env):
    """compute() -> a JSON value, kept in `file` with `key` (what it was computed from: the files it
    read, a seed) and with the options of cfg that compute() read, and read back while both are the
    same: the scored samples of a policy are computed once however many tables read them. Reading it
    back counts those options as read by the task under way, as computing it would. Only the main
    process writes (every process has the same gathered result)."""
    try:
        found = read_json(file)
        options = found.get("options")
        if found.get("key") == key and "value" in found and isinstance(options, dict) and \
                all(k in FIELDS and peek(cfg, k) == v for k, v in options.items()):
            note_reads(options)
            return found["value"]
    except DataError:
        pass  # none yet, or unreadable: compute it again
    with reading() as reads:
        value = compute()
    note_reads(reads)
    if env.master:
        write_json(file, {"key": key, "options": {k: peek(cfg, k) for k in sorted(reads)}, "value": value})
    return value


# -----------------------------------------------------------------------------
# training curves: curves.jsonl, one line per step of every training task (experiments/report.py draws them)

def read_curves(file):
    """The records of a curves file; a line cut short by a crash is skipped."""
    out = []
    for _, line in text_lines(file) if os.path.exists(file) else []:
        try:
            out.append(parse_json(line, file) if isinstance(line, str) else None)  # not UTF-8: a DataError
        except DataError:
            pass
    return [r for r in out if isinstance(r, dict) and "task" in r and "step" in r]


def curves_from(file, task, step):
    """Keep the task's records up to `step` and every other task's: a resumed run continues its curve
    without repeating steps, a fresh one (step 0) starts it anew. Rewriting also drops a torn line."""
    with locked(file):  # tasks of the experiments' workers share the file
        if os.path.exists(file):
            write_jsonl(file, [r for r in read_curves(file) if r["task"] != task or r["step"] <= step])


def curves_append(file, *rows):
    """Rows appended to a curves file. A full disk may cut the last line short: read_curves skips it,
    and the task that resumes rewrites the file without it (curves_from)."""
    with locked(file), writing(file), open(file, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(finite(r), allow_nan=False) + "\n" for r in rows))
