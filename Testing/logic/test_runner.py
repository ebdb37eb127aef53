"""The child-process runner: cancel ends the whole process tree, as Slicer's PythonSlicer
launcher makes one (the launcher's child is the interpreter), and does not block."""

from __future__ import annotations

import os
import stat
import sys
import time
from pathlib import Path

import pytest

from AnomalyLocalizerLib import runner

pytestmark = pytest.mark.skipif(os.name == "nt", reason="the launcher stand-in is a POSIX shell script")


def _alive(pid: int) -> bool:
    """Running, not a zombie (a container's init may not reap orphans at once)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def _launcher(tmp_path: Path, ignore_term: bool) -> tuple[Path, Path]:
    """A stand-in for PythonSlicer: a shell that starts the interpreter as its child (it does
    not exec it) and waits; the 'engine' writes its pid and sleeps, ignoring SIGTERM if asked."""
    pidFile = tmp_path / "engine.pid"
    engine = tmp_path / "engine.py"
    engine.write_text(
        "import os, signal, sys, time\n"
        + ("signal.signal(signal.SIGTERM, signal.SIG_IGN)\n" if ignore_term else "")
        + f"open({str(pidFile)!r}, 'w').write(str(os.getpid()))\n"
        "sys.stderr.write('PROGRESS  10.0 working\\n'); sys.stderr.flush()\n"
        "time.sleep(120)\n")
    launcher = tmp_path / "PythonSlicer"
    launcher.write_text(f"#!/bin/sh\n{sys.executable} {engine}\necho launcher-ended >&2\n")
    launcher.chmod(launcher.stat().st_mode | stat.S_IXUSR)
    return launcher, pidFile


def _start(tmp_path: Path, monkeypatch, ignore_term: bool = False) -> tuple[runner.ChildRun, int]:
    launcher, pidFile = _launcher(tmp_path, ignore_term)
    monkeypatch.setattr(runner, "python_executable", lambda: str(launcher))
    work = runner.new_work_dir()
    run = runner.ChildRun(args=["score"], work_dir=work, out_dir=work / "out").start()
    for _ in range(300):
        if pidFile.exists() and pidFile.read_text() and run.progress > 0:
            break
        time.sleep(0.05)
    enginePid = int(pidFile.read_text())
    assert _alive(enginePid) and run.poll() == "running"
    return run, enginePid


def test_cancel_ends_the_launchers_child_too(tmp_path, monkeypatch):
    run, enginePid = _start(tmp_path, monkeypatch)
    run.cancel()
    assert run.wait(30) == "cancelled"
    assert not _alive(enginePid), "the engine outlived the cancel"
    assert not _alive(run.process.pid)
    assert not run.work_dir.exists()


def test_cancel_returns_at_once_and_kills_what_ignores_being_asked(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "CANCEL_GRACE_S", 1.0)
    run, enginePid = _start(tmp_path, monkeypatch, ignore_term=True)
    run.cancel()
    # cancel() did not wait for the tree: the engine ignoring SIGTERM still runs right after
    assert _alive(enginePid)
    assert run.poll() == "cancelled"
    assert run.wait(30) == "cancelled"
    assert not _alive(enginePid)
    assert not run.work_dir.exists()


def test_cancel_after_the_end_changes_nothing(tmp_path):
    work = runner.new_work_dir()
    run = runner.ChildRun(args=["--version"], work_dir=work, out_dir=work / "out").start()
    state = run.wait(60)
    run.cancel()
    assert run.poll() == state != "cancelled"
    run.cleanup()


def test_a_child_that_cannot_start_leaves_no_work_folder(monkeypatch):
    monkeypatch.setattr(runner, "python_executable", lambda: "/nonexistent/PythonSlicer")
    work = runner.new_work_dir()
    run = runner.ChildRun(args=["score"], work_dir=work, out_dir=work / "out")
    with pytest.raises(OSError):
        run.start()
    assert not work.exists() and run.state == "failed"
    run.cancel()  # nothing to cancel: stays "failed"
    assert run.state == "failed"
