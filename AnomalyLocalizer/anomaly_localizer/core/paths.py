"""Paths a run reads and writes, checked before any work (issue 37).

- A name that is not UTF-8 text (Linux allows any bytes) is refused: SimpleITK aborts the
  whole process on one, and a worklist cannot record it.
- A name longer than the file system allows is refused in one line, not as a traceback.
- Only regular files and folders are opened: a FIFO (or a device, a socket) would block
  the read for ever.
- ``--force`` never replaces a folder that holds an input, a mask or a model in use.
- A results folder is written into a hidden ``.NAME.partial-p<pid>-h<host>-*`` folder
  beside it; one left by a killed run (its process gone) is removed by the next run into
  the same place.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import stat
from pathlib import Path
from typing import Iterable

from ..errors import InputError

NAME_MAX = 255  # bytes in one path component on the common file systems (ext4, xfs, btrfs, APFS, NTFS)
PARTIAL_ROOM = 40  # what a hidden partial folder's name adds to the output folder's name


def shown(path: str | os.PathLike) -> str:
    """A path as text that can always be printed: undecodable bytes as \\xNN."""
    return os.fsencode(os.fspath(path)).decode("utf-8", "backslashreplace")


def is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def name_problem(path: str | os.PathLike) -> str | None:
    """Why a path's name cannot be used (not UTF-8 text, a component too long), or None."""
    text = os.fspath(path)
    if not is_utf8(text):
        return "its name is not valid UTF-8 text; rename it (e.g. with only letters, digits, '-' and '_')"
    long = next((part for part in Path(text).parts if len(part.encode("utf-8")) > NAME_MAX), None)
    if long is not None:
        return (f"the name {long[:24]}... is {len(long.encode('utf-8'))} bytes long, more than the {NAME_MAX} a "
                "file name may have; choose a shorter name")
    return None


def check_name(path: str | os.PathLike, what: str) -> None:
    problem = name_problem(path)
    if problem:
        raise InputError(f"{what} {shown(path)[:80]}: {problem}")


KINDS = {stat.S_IFIFO: "FIFO (named pipe)", stat.S_IFSOCK: "socket", stat.S_IFCHR: "character device",
         stat.S_IFBLK: "block device"}


def check_readable_kind(path: str | os.PathLike, what: str) -> None:
    """Refuse what is neither a regular file nor a folder, without opening it."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # the caller says what is missing
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        kind = KINDS.get(stat.S_IFMT(mode), "special file")
        raise InputError(f"{what} {shown(path)} is a {kind}, not a file or folder; give an image file or a DICOM "
                         "series folder (a pipe or device would be waited on for ever)")


def undecodable_entry(folder: Path) -> str | None:
    """The first name directly in ``folder`` that is not UTF-8 text, shown, or None."""
    try:
        names = os.listdir(folder)
    except OSError:
        return None
    return next((shown(n) for n in names if not is_utf8(n)), None)


def check_out_name(out: Path) -> None:
    """An output folder's name: UTF-8 text, and short enough for its hidden partial folder."""
    check_name(out, "--out")
    limit = NAME_MAX - PARTIAL_ROOM
    if len(out.name.encode("utf-8")) > limit:
        raise InputError(f"--out {out.name[:24]}...: the folder name is {len(out.name.encode('utf-8'))} bytes long; "
                         f"give one of at most {limit} bytes")


def check_force_keeps(out: Path, kept: Iterable[tuple[str, str | os.PathLike | None]]) -> None:
    """Refuse an output folder that is, or holds, a path the run uses (``kept``: (what, path)):
    replacing it (``--force``) would delete that input, mask or model."""
    if not out.exists():
        return
    target = out.resolve()
    for what, path in kept:
        if path is None:
            continue
        p = Path(path).resolve()
        if p == target or target in p.parents:
            raise InputError(f"--out {out} holds the {what} {path} this run reads; replacing it would delete it. "
                             "Choose another --out folder")


# ------------------------------------------------------------------ hidden partial folders

def _host() -> str:
    return hashlib.sha256(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]


def partial_prefix(name: str) -> str:
    """The prefix of the hidden folder a run of this process writes NAME's results into."""
    return f".{name}.partial-p{os.getpid()}-h{_host()}-"


_PARTIAL = re.compile(r"\.partial-p(?P<pid>\d+)-h(?P<host>[0-9a-f]{8})-[^/]*$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # another user's process, or cannot tell: keep its folder
    return True


def clean_stale_partials(parent: Path, name: str) -> list[Path]:
    """Remove hidden partial folders of NAME in ``parent`` whose run (on this machine) is gone;
    return what was removed. Folders of a live run, of another machine, or of another naming
    are left alone."""
    removed = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    host = _host()
    for entry in entries:
        if not entry.name.startswith(f".{name}.partial-"):
            continue
        m = _PARTIAL.search(entry.name[len(name) + 1:])
        if not m or m["host"] != host or int(m["pid"]) == os.getpid() or _alive(int(m["pid"])):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def new_folder(parent: Path, prefix: str) -> Path:
    """A new folder ``parent/prefix<random>`` with the mode the user's umask gives new
    folders (``mkdtemp`` makes 0700 ones; reading the umask means setting it, which changes
    it for every thread of the process, so the kernel applies it here instead)."""
    import secrets
    for _ in range(100):
        path = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            os.mkdir(path, 0o777)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"no free name for a new folder {prefix}* in {parent}")


def new_file(parent: Path, prefix: str) -> tuple[int, Path]:
    """An open descriptor (write-only) and the path of a new file ``parent/prefix<random>``
    with the mode the user's umask gives new files (as :func:`new_folder`)."""
    import secrets
    for _ in range(100):
        path = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), path
        except FileExistsError:
            continue
    raise FileExistsError(f"no free name for a new file {prefix}* in {parent}")
