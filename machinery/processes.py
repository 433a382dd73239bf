"""
machinery/processes.py: the processes of a run. One run per output folder at a time, and worker
processes that never outlive the process that started them.

- claim, release: a run holds its --out_dir for as long as it runs, with a lock that the kernel drops
  when the process ends, however it ends (kill -9 included): a second run into the same folder is
  refused at once, and a killed run never leaves the folder locked. Two runs in one folder would
  both train the same policies and write the same curve steps twice; their records would mix two
  sets of options. Making them safe together would mean waiting on each other task by task, for a
  case that is nearly always a command started twice, so the second is refused instead. The
  experiments' worker processes are the holder's children and take no lock of their own.
- lifeline: called first in a worker process, it makes the worker die with its parent: the kernel's
  parent-death signal on Linux, and a watchdog thread everywhere (it sees the parent gone when the
  worker is handed to another parent). Without it, a parent killed alone (the out-of-memory killer
  picks the largest process) leaves its workers blocked on a pipe, holding their memory.

Standard library only: a worker imports this module before anything else it needs.
"""
import ctypes
import os
import signal
import socket
import sys
import threading
import time

from machinery.files import TEMPORARY, refusal, writing

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; the folder is not guarded there
    fcntl = None

LOCK = "run.lock"  # in the run's folder: who holds it, for the message a second run prints
_held = {}  # absolute folder -> the open lock file: this process's claims


def claim(out_dir):
    """Hold out_dir for this process; None when it holds it (now, or already), else a description of
    the run that does. The lock is flock on run.lock, held open for the life of the process (or until
    release): it belongs to the open file, so the kernel drops it when the process ends, and the
    worker processes, spawned afresh, do not inherit it. Temporaries left by a killed run (atomic
    writes cut short) are removed once the folder is held: no other run is writing there."""
    key = os.path.abspath(out_dir)
    if key in _held or fcntl is None:
        return None
    file = os.path.join(out_dir, LOCK)
    with writing(file):  # held open read-only: a file open for writing would keep its file system from turning read-only
        lock = os.fdopen(os.open(file, os.O_RDONLY | os.O_CREAT, 0o644), encoding="utf-8")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = lock.read().strip() or "a process that has not said which"
        lock.close()
        return holder
    except OSError as e:  # a file system without locks
        lock.close()
        raise refusal(file, e, "lock") from None
    try:
        with writing(file), open(file, "w", encoding="utf-8") as f:
            f.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    except BaseException:
        lock.close()
        raise
    _held[key] = lock
    try:
        remove_temporaries(out_dir)
    except BaseException:
        release(out_dir)
        raise
    return None


def release(out_dir):
    """Let go of out_dir (the end of a run in a process that goes on: the tests, a notebook)."""
    lock = _held.pop(os.path.abspath(out_dir), None)
    if lock is not None:
        lock.close()


def remove_temporaries(out_dir):
    """Every <file>.tmp<pid> under out_dir whose process is gone: what an atomic write killed before
    its rename leaves (files.atomic_path). Never a file of a live process."""
    for folder, _, names in os.walk(out_dir):
        for name in names:
            m = TEMPORARY.search(name)
            if m and not alive(int(m[1])):
                with writing(os.path.join(folder, name), "remove"):
                    os.remove(os.path.join(folder, name))


def alive(pid):
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        return True
    return True


# -----------------------------------------------------------------------------
# workers that die with their parent

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def lifeline(parent):
    """Make this worker process die when `parent` (the pid that started it) does, whatever killed it.
    On Linux the kernel sends SIGKILL at the parent's death (prctl PR_SET_PDEATHSIG); it would not if
    the parent died before the call, so the parent is checked after it; and a watchdog thread, for
    other systems, exits once the worker has another parent."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass  # no prctl: the watchdog alone
    if os.getppid() != parent:
        os._exit(1)
    threading.Thread(target=watchdog, args=(parent,), daemon=True, name="lifeline").start()


def watchdog(parent, every=1.0):
    while True:
        time.sleep(every)
        if os.getppid() != parent:  # orphaned: handed to init or a subreaper
            os._exit(1)
