"""C libraries' own messages kept off the user's terminal.

ITK's image readers and writers (NIfTI, MetaImage) print their own multi-line messages
straight to the process's standard error, beside ITK's warning display; the engine says
what went wrong in one line instead. :func:`quiet_c_stderr` sends file descriptor 2 to a
temporary file for the duration of a read or write (and ITK's warning display off), then
puts both back; what the library said is returned for the caller's message.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import threading
from typing import Iterator

_LOCK = threading.Lock()
_ITK_LOCK = threading.Lock()
_itk_quiet = {"depth": 0, "shown": True}


@contextlib.contextmanager
def itk_warnings_off() -> Iterator[None]:
    """ITK's (process-wide) warning display off within the block, and back as it was after
    the last of several threads' overlapping blocks ends (a plain save-and-restore in two
    threads could leave it off for good)."""
    import SimpleITK as sitk

    with _ITK_LOCK:
        if _itk_quiet["depth"] == 0:
            _itk_quiet["shown"] = bool(sitk.ProcessObject.GetGlobalWarningDisplay())
            sitk.ProcessObject.SetGlobalWarningDisplay(False)
        _itk_quiet["depth"] += 1
    try:
        yield
    finally:
        with _ITK_LOCK:
            _itk_quiet["depth"] -= 1
            if _itk_quiet["depth"] == 0:
                sitk.ProcessObject.SetGlobalWarningDisplay(_itk_quiet["shown"])


@contextlib.contextmanager
def quiet_c_stderr() -> Iterator[list[str]]:
    """Silence C-level output on stderr and ITK's warnings within the block. Yields a list
    that holds, after the block, the lines the libraries printed."""
    with itk_warnings_off():
        with _stderr_captured() as said:
            yield said


@contextlib.contextmanager
def _stderr_captured() -> Iterator[list[str]]:
    said: list[str] = []
    saved = None
    capture = None
    # only the main thread redirects: another thread's prints must not vanish with them
    if threading.current_thread() is threading.main_thread() and _LOCK.acquire(blocking=False):
        try:
            sys.stderr.flush()
            capture = tempfile.TemporaryFile()
            saved = os.dup(2)
            os.dup2(capture.fileno(), 2)
        except (OSError, ValueError, AttributeError):
            if capture is not None:
                capture.close()
            capture = None
            saved = None
            _LOCK.release()
    try:
        yield said
    finally:
        if saved is not None:
            try:
                os.dup2(saved, 2)
                os.close(saved)
                capture.seek(0)
                said += [ln.strip() for ln in capture.read().decode("utf-8", "replace").splitlines() if ln.strip()]
            finally:
                capture.close()
                _LOCK.release()
