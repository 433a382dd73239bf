"""
tools/crashtest.py: the crash-consistency harness. Faults drawn at random meet the pipeline and the
sweep at a tiny size, and every case must end in the exact result of an uninterrupted run, or in one
clear line with exit status 2: never a traceback, never a wrong result with exit status 0.

    python -m tools.crashtest                      # 6 chains and every other case, drawn anew (1 to 3 minutes, 2 cores)
    python -m tools.crashtest --chains=2 --seed=7  # fewer chains, the same draws as another run with --seed=7

The cases (docs/guarantees.md, "Faults"):
- chain: the pipeline then the sweep (python -m experiments sweep), into a folder on a disk of its
  own, meeting one fault per stage and one in the sweep, each at an event drawn at random among that
  stage's (a training step, a file renamed into place, a record or curve written): kill -9, the disk
  filling up, the disk turning read-only. After each, the fault is repaired (space freed, the disk
  writable again) and the same command runs again. The disk is a tmpfs when this machine lets us
  mount one (root); elsewhere the run's own writes are refused by mocking them.
- changed: an input changed between stages (cut short, bytes flipped, another file copied over it):
  the stage that reads it, run alone, refuses it in one line naming it; the full command makes it again.
- dead parent: the sweep's parent killed while its worker processes train: no process outlives it,
  and the same command ends exact.
Every command runs in a forked copy of this process (no imports to pay for), on one thread, like
the reference; the dead-parent case runs real processes. The faults themselves (the disk, the kill
points, the forked command) are in tools/faults.py; tests/test_crash.py runs the fast part.
"""
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

from machinery import records, runtime
from machinery.config import STAGES, ConfigError, parse_options
from machinery.files import read_json, write_json
from machinery.records import read_curves
from tools.faults import Disk, Fault, command, one_line_error, warm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
LABELS = STAGES + ["sweep"]  # where a fault may be drawn: inside each stage, inside the sweep
TINY = ["--device=cpu", "--n_sft=200", "--n_prefs=64", "--n_align=12", "--n_eval=6", "--vocab_size=300", "--n_layer=1",
        "--n_head=2", "--n_embd=32", "--block_size=96", "--max_new_tokens=16", "--sft_steps=6", "--sft_batch=16",
        "--rm_steps=4", "--rm_batch=8", "--n_candidates=3", "--sample_batch=4", "--align_steps=3", "--align_batch=4",
        "--eval_samples=1", "--eval_batch=32", "--log_interval=2", "--ckpt_interval=2", "--warmup_steps=2",
        "--online_iters=2", "--online_prompts=4", "--online_k=2", "--methods=vcb,dpo,ppo",
        "--sweep_seeds=0", "--sweep_lrs=1", "--snapshots=2", "--sweep_kls=0.05,0.5", "--jobs=1"]  # an offline pair and an online method
SWEEP = ("experiments", "sweep")  # the command every chain runs: the stages, then the sweep
MARK = ".crashtest"  # in a work folder this command made: only such a folder is emptied


# -----------------------------------------------------------------------------
# the exact result: what an uninterrupted run wrote, file by file

def compare(ref, out):
    """The differences between two run folders ([] when exact): the same files (locks aside), every
    checkpoint's tensors and values equal, every JSON and text file equal but for where the run was
    (out_dir and the config saved with it, the hashes of checkpoints that carry it), each training
    curve's steps once with the same values."""
    def listing(folder):
        return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs
                      if not f.endswith(".lock") and f not in ("config.json", "time.md"))  # the last command's options and timing
    a, b = listing(ref), listing(out)
    if a != b:
        return [f"files only in the reference: {sorted(set(a) - set(b))}, only here: {sorted(set(b) - set(a))}"]
    return [name for name in a if not same_file(os.path.join(ref, name), os.path.join(out, name), name)]


def same_file(x, y, name):
    if name.endswith(".pt"):
        return same_value(*(torch.load(f, map_location="cpu", weights_only=True) for f in (x, y)))
    if name == "curves.jsonl" or name.endswith("/curves.jsonl"):
        rows = [read_curves(f) for f in (x, y)]
        keyed = [{(r["task"], r["step"]): r for r in rs} for rs in rows]
        return len(rows[0]) == len(keyed[0]) and len(rows[1]) == len(keyed[1]) and keyed[0] == keyed[1]
    if name == "stages.json":
        return same_value(*(records_without_checkpoint_hashes(read_json(f)) for f in (x, y)))
    if name.endswith(".json"):
        return same_value(*(placeless(read_json(f)) for f in (x, y)))
    if name.endswith("curves.png"):
        return True  # drawn from curves.jsonl, compared above, whose rows a resumed run writes in another order
    return open(x, "rb").read() == open(y, "rb").read()


def placeless(value):
    """A JSON value without what says where its run was: the saved config, out_dir, the key of kept
    results (file hashes)."""
    if isinstance(value, dict):
        return {k: placeless(v) for k, v in value.items() if k not in ("config", "out_dir", "key")}
    return value


def records_without_checkpoint_hashes(stages):
    """stages.json without the hashes of files that say where their run was (checkpoints and JSON
    files keep the config; compare() reads those files themselves)."""
    return {name: {k: {f: h for f, h in v.items() if not f.endswith((".pt", ".json"))} if k in ("inputs", "outputs") else v
                   for k, v in rec.items()} for name, rec in stages.items()}


def same_value(a, b, skip=("config",)):
    if isinstance(a, dict) and isinstance(b, dict):
        keys = set(a) - set(skip)
        return keys == set(b) - set(skip) and all(same_value(a[k], b[k], ()) for k in keys)
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_value(p, q, ()) for p, q in zip(a, b))
    return a == b


def finished_is_true(out):
    """None when every task stages.json calls finished has its outputs as it recorded them (nothing
    that looks finished is wrong), else the first that does not."""
    file = os.path.join(out, "stages.json")
    records._hashes.clear()  # hashed afresh: the runs between two checks rewrite files
    for name, rec in (read_json(file) if os.path.exists(file) else {}).items():
        for f, h in rec["outputs"].items():
            if records.file_hash(os.path.join(out, f)) != h:
                return f"stages.json calls {name} finished, but {f} is not what it wrote"
    return None


# -----------------------------------------------------------------------------
# the cases

def reference(work):
    """The uninterrupted run (the stages, then the sweep) in work/ref: (its folder, its events by label)."""
    out = os.path.join(work, "ref")
    o = command(os.path.join(work, "ref-log"), [f"--out_dir={out}", *TINY], SWEEP)
    if o.code != 0:
        raise RuntimeError(f"the reference run failed: {o.err[-2000:]}")
    return out, o.counts


def draw_chain(rng, counts):
    """One fault in each label at an event drawn uniformly among its events: a disk filling up in one
    label and turning read-only in another (drawn), kill -9 in the rest."""
    labels = [lab for lab in LABELS if counts.get(lab)]
    full, readonly = rng.sample(labels, 2)
    return [Fault("full" if lab == full else "readonly" if lab == readonly else "kill", lab, rng.randint(1, counts[lab]),
                  counts[lab]) for lab in labels]


def chain(ref, disk, work, faults):
    """The pipeline and the sweep into a folder on disk, meeting faults in turn: after each, the check
    of how it ended, the repair and the same command again, until a run ends with exit status 0,
    whose folder must be the reference's. Returns (ok, the lines of its report)."""
    out, (ref_dir, _) = os.path.join(disk.root, "out"), ref
    pending, lines, ok = list(faults), [], True
    for attempt in range(len(faults) + 1):
        o = command(os.path.join(work, f"run{attempt}"), [f"--out_dir={out}", *TINY], SWEEP, pending, disk)
        struck = [pending[i] for i in o.fired]
        pending = [f for i, f in enumerate(pending) if i not in o.fired]
        kinds = {f.kind for f in struck}  # a full disk may be freed by the run itself (a checkpoint removed) and a later fault strike
        if "kill" in kinds:
            problem = None if o.code == -signal.SIGKILL else f"exit status {o.code}, not killed: {o.err[-800:]!r}"
        elif kinds:  # a full or read-only disk that met no write before the end: then the run must be exact
            problem = one_line_error(o, disk.root) if o.code != 0 else None
        else:
            problem = None if o.code == 0 else f"exit status {o.code} with no fault: {o.err[-800:]!r}"
        disk.repair()
        problem = problem or finished_is_true(out)
        if o.code == 0 and not problem:
            diff = compare(ref_dir, out)
            problem = f"exit status 0 but not the uninterrupted result: {diff[:5]}" if diff else None
        said = [x[x.index("error:"):] for x in o.err.replace("\r", "\n").splitlines() if "error:" in x]
        lines.append(f"  {', then '.join(map(str, struck)) or 'no fault'}: " + (f"FAILED: {problem}" if problem else
                     "killed" if o.code == -9 else said[0] if said else "exact"))
        ok = ok and not problem
        if o.code == 0 or problem:
            break
    lines += [f"  {f}: not reached (the work was done before it)" for f in pending]
    return ok, lines


def flip(file):
    """A few bytes of a checkpoint's first weight matrix flipped in place: torch.load still reads it."""
    blob = bytearray(open(file, "rb").read())
    weights = next(v for v in torch.load(file, weights_only=True)["model"].values() if v.numel() >= 64)
    at = bytes(blob).find(weights.numpy().tobytes()[:64])
    for k in range(8):
        blob[at + 16 + k] ^= 0x10
    open(file, "wb").write(bytes(blob))
    torch.load(file, weights_only=True)


def cut(file):
    lines = open(file, encoding="utf-8").read().splitlines(keepends=True)
    open(file, "w", encoding="utf-8").write("".join(lines[:len(lines) // 2]))


CHANGES = {  # name: (the file, the change, the command that reads it alone: program and args, or None)
    "candidates cut to half its lines": ("candidates.jsonl", cut, (("train.py",), ["--stage=align"])),
    "sft.pt with bytes flipped": ("sft.pt", flip, (("train.py",), ["--stage=rm"])),
    "rm.pt with bytes flipped": ("rm.pt", flip, (("train.py",), ["--stage=sample"])),
    "data/prefs.jsonl cut to half its lines": ("data/prefs.jsonl", cut, (("train.py",), ["--stage=rm"])),
    "policy_dpo.pt copied over policy_vcb.pt": ("policy_vcb.pt", lambda f: shutil.copy(os.path.join(os.path.dirname(f),
                                                "policy_dpo.pt"), f), (("train.py",), ["--stage=eval"])),
    "sft.pt with bytes flipped, under the sweep alone": ("sft.pt", flip, None),  # the sweep makes each seed's pipeline again
    "a sweep policy with bytes flipped": ("sweep/policy_vcb-beta1-lr1.pt", flip, None),
}


def changed(ref, work, name):
    """An input changed between stages (CHANGES[name]) in a copy of the reference: the command that
    reads it alone refuses it in one line naming it; the full command then ends exact. (ok, line)."""
    file, change, alone = CHANGES[name]
    out = os.path.join(work, "out")
    shutil.copytree(ref[0], out)
    change(os.path.join(out, file))
    if alone is not None:
        o = command(os.path.join(work, "alone"), [f"--out_dir={out}", *TINY, *alone[1]], alone[0])
        problem = one_line_error(o, os.path.join(out, file))
        if problem:
            return False, f"  {name}: FAILED alone: {problem}"
    o = command(os.path.join(work, "full"), [f"--out_dir={out}", *TINY], SWEEP)
    diff = compare(ref[0], out) if o.code == 0 else None
    if o.code != 0 or diff:
        return False, f"  {name}: FAILED by the full command: exit status {o.code}, differences {diff}: {o.err[-800:]!r}"
    return True, f"  {name}: refused alone, then exact" if alone else f"  {name}: made again, exact"


def session_processes(sid):
    """The live processes of a session (the command and everything it started)."""
    out = []
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = open(f"/proc/{p}/stat").read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[3]) == sid and fields[0] != "Z":
            out.append(int(p))
    return out


def dead_parent(ref, work, delay):
    """The sweep's parent (python -m experiments sweep --jobs=2, a real process) killed `delay`
    seconds after its workers start: every process it started must be gone within 30 s, and the
    same command then ends exact. (ok, line)."""
    out = os.path.join(work, "out")
    shutil.copytree(ref[0], out, ignore=lambda d, names: ["sweep"] if d == ref[0] else [])
    stages = read_json(os.path.join(out, "stages.json"))
    write_json(os.path.join(out, "stages.json"), {k: v for k, v in stages.items() if not k.startswith("sweep-")})
    cmd = [sys.executable, "-m", *SWEEP, f"--out_dir={out}", *TINY, "--jobs=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    log = os.path.join(work, "parent.log")
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 120
    while "worker processes" not in open(log).read() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(delay)
    workers = [p for p in session_processes(proc.pid) if p != proc.pid]
    proc.kill()
    proc.wait()
    deadline = time.time() + 30
    while session_processes(proc.pid) and time.time() < deadline:
        time.sleep(0.1)
    left = session_processes(proc.pid)
    for p in left:
        os.kill(p, signal.SIGKILL)
    if left:
        return False, f"  parent killed {delay:.1f}s into the sweep: FAILED: {len(left)} of its processes outlived it"
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    diff = compare(ref[0], out) if again.returncode == 0 else None
    if again.returncode != 0 or diff:
        return False, f"  parent killed {delay:.1f}s into the sweep: FAILED again: {again.returncode}, {diff}, {again.stderr[-800:]!r}"
    return True, (f"  parent killed {delay:.1f}s into the sweep ({len(workers)} processes under it): none outlived it; "
                  f"the same command again: exact")


@dataclass
class CrashConfig:
    chains: int = 6                  # chains of faults, each through every stage and the sweep
    seed: int = 0                    # of the draws (0: one from the clock, printed, to draw the same again)
    work: str = "crashtest"          # folder for the runs (emptied first, if this command made it)
    mock: bool = False               # mock the write calls even where a tmpfs could be mounted


def empty_work_folder(work):
    """work emptied for this run, if it is one this command made (it holds MARK) or new; a disk a
    killed run left mounted there is unmounted first."""
    if os.path.isdir(work) and os.listdir(work) and not os.path.exists(os.path.join(work, MARK)):
        raise ConfigError(f"--work={work}: a folder this command did not make; it empties its folder first, so name another")
    with open("/proc/mounts") if os.path.exists("/proc/mounts") else open(os.devnull) as mounts:
        for point in [line.split()[1] for line in mounts if line.split()[1].startswith(work + os.sep)]:
            subprocess.run(["umount", "-l", point], capture_output=True)
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    open(os.path.join(work, MARK), "w").close()


def main(argv):
    opts = parse_options(CrashConfig(), argv, __doc__)
    seed = opts.seed or int(time.time()) % 100_000 + 1
    rng, work = random.Random(seed), os.path.abspath(opts.work)
    empty_work_folder(work)
    warm()
    t0 = time.time()
    ref = reference(work)
    print(f"seed {seed}; the uninterrupted run's events by label: {ref[1]}")
    results = []
    for k in range(opts.chains):
        disk = Disk(os.path.join(work, f"disk{k}"), mock=opts.mock)
        try:
            ok, lines = chain(ref, disk, os.path.join(work, f"chain{k}"), draw_chain(rng, ref[1]))
        finally:
            disk.close()
        print(f"chain {k + 1} on a {disk.kind} disk: {'held' if ok else 'FAILED'}\n" + "\n".join(lines))
        results.append(ok)
    print("inputs changed between stages:")
    for k, name in enumerate(CHANGES):
        ok, line = changed(ref, os.path.join(work, f"changed{k}"), name)
        print(line)
        results.append(ok)
    ok, line = dead_parent(ref, os.path.join(work, "parent"), rng.uniform(0.0, 3.0))
    print("a dead parent:\n" + line)
    results.append(ok)
    print(f"{sum(results)} of {len(results)} cases held ({time.time() - t0:.0f}s)")
    if not all(results):
        sys.exit(1)


if __name__ == "__main__":
    runtime.command(main)
