"""The crash-consistency harness's fast part (tools/crashtest.py; `python -m tools.crashtest` draws
many more, anew each run): kill points drawn at random inside every stage and inside the sweep, a
disk that fills up or turns read-only (a tmpfs where this machine lets us mount one, and mocked
writes, which is what runs where it does not), inputs changed between stages, a dead parent with its
workers, two runs in one folder. Each case ends in the exact result of an uninterrupted run or in one
clear line with exit status 2 (docs/guarantees.md, "Faults"). The draws are seeded: CI sees the same
ones every run. Every command runs in a forked copy of the test process, so the cases cost seconds."""
import builtins
import errno
import os
import random
import signal
import subprocess
import sys
import time

import pytest

import train
from conftest import ROOT
from machinery import runtime
from tools import crashtest, faults

SEED = 3  # of the fast part's draws; python -m tools.crashtest draws new ones
PROC = pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds a session's processes in /proc (Linux)")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run (the stages, then the sweep) every case compares with, and its events by label."""
    faults.warm()
    drawn, faults.DRAW_CURVES = faults.DRAW_CURVES, False  # curves.png blank: drawing it costs seconds a run
    yield crashtest.reference(str(tmp_path_factory.mktemp("crash")))
    faults.DRAW_CURVES = drawn


@pytest.mark.parametrize("mock", [False, True], ids=["tmpfs where it can be mounted", "mocked writes"])
def test_kill_points_and_a_failing_disk_in_every_stage_and_the_sweep(reference, tmp_path, mock):
    """One fault in each stage and in the sweep, each at an event drawn among that stage's: kill -9,
    the disk filling up, the disk turning read-only. After each, the repair and the same command; the
    first run that ends with exit status 0 has the uninterrupted run's result, file by file."""
    drawn = crashtest.draw_chain(random.Random(SEED + mock), reference[1])
    assert {f.label for f in drawn} == set(crashtest.LABELS) and {f.kind for f in drawn} == {"kill", "full", "readonly"}
    disk = faults.Disk(tmp_path / "disk", mock=mock)
    try:
        ok, lines = crashtest.chain(reference, disk, str(tmp_path / "work"), drawn)
    finally:
        disk.close()
    report = f"on a {disk.kind} disk:\n" + "\n".join(lines)
    print(report)
    assert ok, report
    assert not any("not reached" in line for line in lines), report  # every fault struck inside its stage
    assert any("Read-only file system" in line for line in lines) and any("No space left" in line or "killed" in line
                                                                           for line in lines), report


@pytest.mark.parametrize("code,says", [(errno.ENOSPC, "the device is full"), (errno.EDQUOT, "disk quota"),
                                       (errno.EROFS, "read-only"), (errno.EACCES, "permission denied"),
                                       (errno.EPERM, "permission denied"), (errno.ENOTDIR, "a file is in the way"),
                                       (errno.EIO, "input/output error")])
def test_every_refusal_of_the_file_system_is_one_line_naming_the_path_and_what_to_do(tmp_path, monkeypatch, capsys, code, says):
    """Whatever refuses a write (here the first file the data stage writes: as root, a folder cannot
    be made unwritable, so the refusal is mocked), the command ends with one line and exit status 2."""
    out, real_open = tmp_path / "out", builtins.open

    def refusing(file, mode="r", *args, **kwargs):
        if "data" in str(file) and any(c in mode for c in "wa"):
            raise OSError(code, os.strerror(code))  # as write(2) says it: no path
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refusing)
    monkeypatch.setattr(sys, "argv", ["train.py", f"--out_dir={out}", *crashtest.TINY, "--stage=data"])
    with pytest.raises(SystemExit) as e:
        runtime.command(train.main)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"error: {out / 'data'}") and says in err and err.endswith("then run the same command again")
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]  # nothing half-written


@pytest.mark.parametrize("name", list(crashtest.CHANGES))
def test_an_input_changed_between_stages_is_refused_alone_and_made_again_by_the_full_command(reference, tmp_path, name):
    ok, line = crashtest.changed(reference, str(tmp_path), name)
    assert ok, line


def test_a_second_run_into_a_folder_in_use_is_refused_at_once_and_a_killed_holder_leaves_it_free(reference, tmp_path):
    out, work = tmp_path / "out", str(tmp_path / "work")
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from machinery import processes; "
                               "assert processes.claim(sys.argv[1]) is None; print('held', flush=True); time.sleep(600)",
                               str(out)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        second = faults.command(work, [f"--out_dir={out}", *crashtest.TINY, "--stage=data"])
        assert crashtest.one_line_error(second, f"--out_dir={out} is in use by another run (pid {holder.pid} ") is None
        assert not (out / "data").exists()  # refused before it did anything
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    again = faults.command(work, [f"--out_dir={out}", *crashtest.TINY, "--stage=data"])
    assert again.code == 0, again.err[-2000:]


@PROC
def test_a_dead_parent_takes_its_workers_with_it(tmp_path):
    """The experiments' worker pool (harness.worker_pool) in a parent that is then killed alone, as the
    out-of-memory killer does: the workers and everything else it started end with it."""
    with open(tmp_path / "stderr", "w") as err:  # the orphaned resource tracker's warning goes there too
        parent = subprocess.Popen([sys.executable, "-c", "import os, time; from experiments import harness; "
                                   "pool = harness.worker_pool(1); print(pool.submit(os.getpid).result(), flush=True); "
                                   "pool.submit(time.sleep, 600); time.sleep(600)"],
                                  cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True,
                                  env={**os.environ, "OMP_NUM_THREADS": "1"})
    line = parent.stdout.readline()
    assert line.strip().isdigit(), (tmp_path / "stderr").read_text()[-2000:]
    worker = int(line)
    assert worker in crashtest.session_processes(parent.pid)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 30
    while crashtest.session_processes(parent.pid) and time.time() < deadline:
        time.sleep(0.05)
    left = crashtest.session_processes(parent.pid)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"{len(left)} processes outlived their parent"


@PROC
@pytest.mark.slow
def test_a_sweep_whose_parent_is_killed_while_its_workers_train_leaves_no_process_and_resumes_exact(reference, tmp_path):
    ok, line = crashtest.dead_parent(reference, str(tmp_path), delay=1.0)
    assert ok, line
