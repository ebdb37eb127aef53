"""Running the engine in a child process, with progress and cancel (no Qt, no Slicer).

The GUI stays responsive because the engine runs in another Python process (Slicer's own
``PythonSlicer`` inside Slicer): the same ``anomaly-localizer score`` entry point the
command line uses, so what CI tests is what Slicer runs. Progress comes from the child's
``PROGRESS <percent> <message>`` lines on stderr; cancel ends the process.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

MODULE_DIR = Path(__file__).resolve().parent.parent  # holds the engine package anomaly_localizer


def python_executable() -> str:
    """Slicer's PythonSlicer when present (inside Slicer), else this interpreter."""
    return shutil.which("PythonSlicer") or sys.executable


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

    def start(self) -> "ChildRun":
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(MODULE_DIR), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        self.process = subprocess.Popen([python_executable(), "-m", "anomaly_localizer.cli", *self.args],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
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
        if self.state == "cancelled":
            return
        self.state = "done" if code == 0 else "failed"

    def poll(self) -> str:
        return self.state

    def wait(self, timeout: float | None = None) -> str:
        if self._reader is not None:
            self._reader.join(timeout)
        return self.state

    @property
    def error(self) -> str:
        """The child's own one-line message (``error: ...``), else its last lines."""
        for line in self.error_lines:
            if line.startswith("error: "):
                return line[len("error: "):]
        return "\n".join(self.error_lines[-5:]) or "the engine stopped without a message"

    def cancel(self) -> None:
        self.state = "cancelled"
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.cleanup()

    def cleanup(self) -> None:
        shutil.rmtree(self.work_dir, ignore_errors=True)


def new_work_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="AnomalyLocalizer-"))
