"""
tools/faults.py: faults for the crash-consistency harness (tools/crashtest.py) to strike a command with.

- Disk: a folder that fills up or turns read-only on cue: a tmpfs of its own where mounting is
  allowed (root), else a plain folder whose writes the command's process refuses itself (mocked).
- Fault, Events: kill -9, a full disk or a read-only disk, struck at an event drawn within a label
  (a stage, or sweep): a training step, an atomic write's rename (before and after), a change to
  the stage records, curve rows about to be appended.
- command: train.py or python -m experiments NAME in a forked copy of this process (no imports to
  pay for) on one thread, with faults armed; what it ended with (Outcome).
"""
import builtins
import errno
import io
import json
import os
import signal
import subprocess
import sys
import traceback
from dataclasses import dataclass

import torch

from experiments import report
from machinery import records, runtime
from machinery.files import read_json

DRAW_CURVES = True  # False: curves.png is written blank (drawing it takes seconds a run; the fast tests save them)


# -----------------------------------------------------------------------------
# a disk that fills up or turns read-only

class Disk:
    """A folder that a fault can fill up or turn read-only. A tmpfs of its own when mounting is allowed;
    otherwise (mock=True, or mount refused) a plain folder whose writes the forked command refuses
    itself, with the OSError the kernel would raise."""

    def __init__(self, root, size_mb=64, mock=False):
        self.root, self.mode = os.path.abspath(root), None
        os.makedirs(self.root, exist_ok=True)
        try:
            self.mounted = not mock and subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", self.root],
                                                       capture_output=True).returncode == 0
        except OSError:  # no mount command
            self.mounted = False
        self.kind = "tmpfs" if self.mounted else "mocked writes"

    def fail(self, kind):
        """In the command's process: the disk is full (kind 'full') or read-only from now on."""
        if not self.mounted:
            self.mode = kind
        elif kind == "full":  # a ballast file takes every free block
            with open(os.path.join(self.root, "ballast"), "wb", buffering=0) as f:
                for size in (1 << 20, 4096, 1):
                    try:
                        while True:
                            f.write(b"\0" * size)
                    except OSError:
                        pass
        else:
            self.remount("ro")

    def repair(self):
        """What the user does after the error: free the space, make the disk writable again."""
        if self.mounted:
            self.remount("rw")
            if os.path.exists(os.path.join(self.root, "ballast")):
                os.remove(os.path.join(self.root, "ballast"))

    def remount(self, how):
        subprocess.run(["mount", "-o", f"remount,{how}", self.root], check=True, capture_output=True)

    def close(self):
        if self.mounted:
            subprocess.run(["umount", "-l", self.root], capture_output=True)
            self.mounted = False

    def mock(self):
        """In the command's process, where no tmpfs could be mounted: once fail() has been called, a
        write under root fails as the kernel's would. Read-only: opening for writing, creating,
        renaming and removing raise EROFS naming the path. Full: a file opens, and its first write
        raises ENOSPC naming no path, as write(2) does (so only its writer can say which file);
        creating a folder raises it too."""
        real = dict(open=builtins.open, os_open=os.open, mkdir=os.mkdir, replace=os.replace, rename=os.rename,
                    remove=os.remove, unlink=os.unlink)

        def inside(path):
            return self.mode and isinstance(path, (str, os.PathLike)) and os.path.abspath(path).startswith(self.root + os.sep)

        def refused(path, modes=("full", "readonly")):
            if inside(path) and self.mode in modes:
                code = errno.ENOSPC if self.mode == "full" else errno.EROFS
                raise OSError(code, os.strerror(code), str(path))

        class Full(io.FileIO):
            def write(self, data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def opener(file, mode="r", buffering=-1, encoding=None, errors=None, newline=None, closefd=True, opener=None):
            if not any(c in mode for c in "wax+"):
                return real["open"](file, mode, buffering, encoding, errors, newline, closefd, opener)
            refused(file, ("readonly",))
            if not inside(file):
                return real["open"](file, mode, buffering, encoding, errors, newline, closefd, opener)
            raw = Full(file, mode.replace("b", "").replace("t", ""))
            binary = io.BufferedWriter(raw)
            return binary if "b" in mode else io.TextIOWrapper(binary, encoding or "utf-8", errors, newline)

        def os_open(path, flags, *args, **kwargs):
            if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC) or flags & os.O_CREAT and not os.path.exists(path):
                refused(path, ("readonly",))
            return real["os_open"](path, flags, *args, **kwargs)

        def guard(name, modes):
            def call(path, *args, **kwargs):
                refused(path, modes)
                return real[name](path, *args, **kwargs)
            return call

        builtins.open, os.open, os.mkdir = opener, os_open, guard("mkdir", ("full", "readonly"))
        os.replace, os.rename, os.remove, os.unlink = (guard(n, ("readonly",)) for n in ("replace", "rename", "remove", "unlink"))


# -----------------------------------------------------------------------------
# faults at events, in a forked command

@dataclass
class Fault:
    kind: str    # kill (SIGKILL), full (the disk fills up), readonly (the disk turns read-only)
    label: str   # the stage it is drawn in, or sweep
    at: int      # the event it strikes at, counted within its label in the run under way
    of: int = 0  # the label's events in an uninterrupted run

    def __str__(self):
        what = {"kill": "kill -9", "full": "disk full", "readonly": "disk read-only"}[self.kind]
        return f"{what} in {self.label} at event {self.at} of {self.of}"


class Events:
    """Counts the events of the command under way by label (its stage, or sweep) and strikes each
    armed fault at its event. An event: a training step, an atomic write's rename (before and after),
    a change to the stage records, curve rows about to be appended."""

    def __init__(self, faults, disk, fired_file):
        self.faults, self.disk, self.fired_file, self.label, self.counts = faults, disk, fired_file, "data", {}

    def __call__(self):
        self.counts[self.label] = self.counts.get(self.label, 0) + 1
        for i, f in enumerate(self.faults):
            if f.label == self.label and f.at == self.counts[self.label]:
                with open(self.fired_file, "a") as out:  # before it strikes: a kill leaves no time after
                    out.write(f"{i}\n")
                if f.kind == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                self.disk.fail(f.kind)

    def install(self):
        import train
        from experiments import harness
        from machinery import progress, records

        def around(owner, name, before=True, label=None):
            real = getattr(owner, name)

            def call(*args, **kwargs):
                if label is not None:
                    self.label = label(*args) if callable(label) else label
                if before:
                    self()
                out = real(*args, **kwargs)
                if not before:
                    self()
                return out
            setattr(owner, name, call)

        # the sweep runs each seed's stages before alignment itself: those count as the sweep's events
        around(train, "run_stage", before=False, label=lambda cfg, env, stage: "sweep" if self.label == "sweep" else stage)
        around(harness, "run_jobs", before=False, label="sweep")
        around(records, "update_records")
        around(records, "curves_append")
        around(progress.Progress, "record", before=False)
        real_replace = os.replace

        def replace(*args, **kwargs):
            self()
            real_replace(*args, **kwargs)
            self()
        os.replace = replace


@dataclass
class Outcome:
    code: int        # exit status; -9 when killed
    err: str         # what it wrote to stderr
    fired: list      # the faults that struck, by index
    counts: dict     # events by label (when it ran to its end)


def command(work, args, program=("train.py",), faults=(), disk=None):
    """One command (train.py, or experiments NAME) with args, in a forked copy of this process on one
    thread, faults armed; its stdout and stderr go to files in work. The Outcome."""
    os.makedirs(work, exist_ok=True)
    fired, counts = os.path.join(work, "fired"), os.path.join(work, "counts.json")
    for f in (fired, counts):
        if os.path.exists(f):
            os.remove(f)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            for fd, name in ((1, "stdout"), (2, "stderr")):
                os.dup2(os.open(os.path.join(work, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
            sys.stdout, sys.stderr = open(1, "w", closefd=False), open(2, "w", closefd=False, buffering=1)
            torch.set_num_threads(1)
            records._hashes.clear()  # hashes this process computed before the files changed
            events = Events(list(faults), disk or Disk(work, mock=True), fired)
            events.install()
            if not DRAW_CURVES:  # still written, through the same atomic write
                report.plot_curves = lambda file, png: report.save_figure(report.pyplot(), report.pyplot().figure(), png)
            if disk is not None and not disk.mounted:
                disk.mock()
            if program[0] == "train.py":
                import train as main_module
            else:
                import experiments.__main__ as main_module
            sys.argv = [*program, *args]
            try:
                runtime.command(main_module.main)
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
            with builtins.open(counts, "w") as f:
                json.dump(events.counts, f)
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    err = open(os.path.join(work, "stderr"), encoding="utf-8", errors="replace").read()
    struck = [int(x) for x in open(fired).read().split()] if os.path.exists(fired) else []
    return Outcome(os.waitstatus_to_exitcode(status), err, struck, read_json(counts) if os.path.exists(counts) else {})


def warm():
    """What a command would import lazily, imported once in this process before the forks: pyplot, and
    the modules torch loads to build a model on the meta device (seconds each time otherwise)."""
    from model import GPT, GPTConfig
    report.pyplot()
    with torch.device("meta"):
        GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, vocab_size=257, block_size=8))


def one_line_error(outcome, naming=""):
    """None when the command ended with one clear line (exit status 2, one 'error:' line naming
    `naming`, no traceback), else what was wrong."""
    lines = [x for x in outcome.err.replace("\r", "\n").splitlines() if "error:" in x]
    if outcome.code != 2 or "Traceback" in outcome.err or len(lines) != 1 or naming not in lines[0]:
        return f"exit status {outcome.code}, not one clear line naming {naming or 'a file'}: {outcome.err[-800:]!r}"
    return None
