"""Running the engine in a child process, with progress and cancel (no Qt, no Slicer).

The GUI stays responsive because the engine runs in another Python process (Slicer's own
``PythonSlicer`` inside Slicer): the same ``anomaly-localizer score`` entry point the
command line uses, so what CI tests is what Slicer runs. Progress comes from the child's
``PROGRESS <percent> <message>`` lines on stderr.

Cancel ends the whole process tree, at once and without blocking the caller: inside Slicer
``PythonSlicer`` is a launcher whose child is the interpreter, so ending the launcher alone
would leave the engine running. The child starts in a process group of its own (a new
session on POSIX, a new process group on Windows), which cancel ends as one.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

MODULE_DIR = Path(__file__).resolve().parent.parent  # holds the engine package anomaly_localizer
CANCEL_GRACE_S = 5.0  # after asking the tree to stop, how long before it is killed


def python_executable() -> str:
    """Slicer's PythonSlicer when present (inside Slicer), else this interpreter."""
    return shutil.which("PythonSlicer") or sys.executable


def _own_group_options() -> dict:
    """Popen options: the child leads a process group of its own (so cancel can end its
    whole tree) and, on Windows, opens no console window (as Slicer's own
    ``launchConsoleProcess`` does)."""
    if os.name == "nt":
        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW}
    return {"start_new_session": True}


def end_process_tree(process: subprocess.Popen, force: bool) -> None:
    """Ask (or, with ``force``, make) a child started with :func:`_own_group_options` and
    every process it started stop. Processes already gone are not an error."""
    if os.name == "nt":
        # taskkill /T ends the tree; without /F it asks, and console processes ignore asking.
        subprocess.run(["taskkill", "/T", "/F", "/PID", str(process.pid)], capture_output=True,
                       creationflags=subprocess.CREATE_NO_WINDOW)
        return
    try:
        os.killpg(process.pid, signal.SIGKILL if force else signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        pass  # the group has ended


@dataclass
class ChildRun:
    """One engine run in a child process. Poll :attr:`state`; results land in :attr:`out_dir`."""

    args: list[str]
    work_dir: Path
    out_dir: Path
    process: subprocess.Popen | None = None
    progress: float = 0.0
    message: str = "starting"
    error_lines: list[str] = field(default_factory=list)
    state: str = "running"  # running | done | failed | cancelled
    _reader: threading.Thread | None = None
    _ender: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def start(self) -> "ChildRun":
        """Start the child; when it cannot start (no Python executable, no memory), the work
        folder is removed, the state is "failed" and the error raised."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(MODULE_DIR), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        try:
            self.process = subprocess.Popen([python_executable(), "-m", "anomaly_localizer.cli", *self.args],
                                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                                            **_own_group_options())
        except BaseException:
            self.state = "failed"
            self.cleanup()
            raise
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        assert self.process is not None and self.process.stderr is not None
        for line in self.process.stderr:
            line = line.rstrip()
            if line.startswith("PROGRESS "):
                # "PROGRESS  10.0 message": the percent is right-aligned, so split on runs of spaces
                parts = line.split(None, 2)
                try:
                    self.progress = min(1.0, max(self.progress, float(parts[1]) / 100.0))
                except (IndexError, ValueError):
                    pass
                self.message = parts[2] if len(parts) > 2 else ""
            elif line:
                self.error_lines.append(line)
        code = self.process.wait()
        with self._lock:  # a cancel that comes now must not be overwritten (nor come after "done")
            if self.state == "running":
                self.state = "done" if code == 0 else "failed"

    def poll(self) -> str:
        return self.state

    def wait(self, timeout: float | None = None) -> str:
        """Wait until the child (and, after a cancel, its whole tree) has ended."""
        for thread in (self._reader, self._ender):
            if thread is not None:
                thread.join(timeout)
        return self.state

    @property
    def error(self) -> str:
        """The child's own one-line message (``error: ...``), else its last lines."""
        for line in self.error_lines:
            if line.startswith("error: "):
                return line[len("error: "):]
        return "\n".join(self.error_lines[-5:]) or "the engine stopped without a message"

    def cancel(self) -> None:
        """Stop the run and its whole process tree; returns at once (a GUI must not wait).
        The tree is asked to stop, killed if it has not after :data:`CANCEL_GRACE_S`, and
        the work folder removed once it has ended; :meth:`wait` waits for all of that."""
        with self._lock:
            if self.state != "running":
                return
            self.state = "cancelled"
        if self.process is None:
            self.cleanup()
            return
        end_process_tree(self.process, force=False)
        self._ender = threading.Thread(target=self._end_after_cancel, daemon=True)
        self._ender.start()

    def _end_after_cancel(self) -> None:
        assert self.process is not None
        # The grace period is the whole tree's: stderr reaches its end only when every process
        # holding it (the launcher and the interpreter it started) has ended.
        if self._reader is not None:
            self._reader.join(CANCEL_GRACE_S)
        else:
            try:
                self.process.wait(CANCEL_GRACE_S)
            except subprocess.TimeoutExpired:
                pass
        # Whatever is left of the tree (a launcher's child outlives its launcher) goes now; a
        # tree that has ended is not signalled again (its group ID could be anyone's by now).
        if self._reader is None or self._reader.is_alive():
            end_process_tree(self.process, force=True)
        self.process.wait()
        if self._reader is not None:
            self._reader.join()  # stderr closes when the last process of the tree has ended
        self.cleanup()

    def cleanup(self) -> None:
        shutil.rmtree(self.work_dir, ignore_errors=True)


def new_work_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="AnomalyLocalizer-"))
