"""What a reader may make the server do: which paths open, how large an upload, an unpacked
archive or a message may be, how long a name. Plain Python (no Slicer, no trame), so that each
bound is tested on its own; :mod:`.session` and :mod:`.wsguard` apply them.

- Opening by path is limited to the folders given when the server starts (``--allow-folder``;
  the start path's folder counts). Paths are resolved first, so a link out of such a folder is
  refused like the place it leads to.
- Nothing is read that is not a regular file or a folder (a FIFO or a device would block the
  server's one thread): :func:`check_openable` looks with ``os.stat`` before anything opens it.
- An uploaded zip is unpacked member by member within :data:`MAX_EXTRACTED_BYTES` and
  :data:`MAX_MEMBERS`; links and members that would leave the folder are refused.
"""

from __future__ import annotations

import os
import re
import stat
import zipfile
from pathlib import Path

from .errors import ViewerError, one_line

MiB = 1024 ** 2
MAX_UPLOAD_BYTES = 512 * MiB  # a 1 mm whole head is ~30 MB; a DICOM series is uploaded as a zip
MAX_EXTRACTED_BYTES = 1024 * MiB  # what one uploaded zip may unpack to
MAX_MEMBERS = 10000  # files in one uploaded zip (a thin-slice series has a few thousand)
MAX_MESSAGE_BYTES = MAX_UPLOAD_BYTES + 4 * MiB  # one WebSocket message of the page (an upload and its wrapping)
MAX_NAME_CHARS = 100  # an uploaded file's name as kept on the server
MAX_SESSIONS = 4  # readers served at once (each has its own server process, ~0.5-1 GB)
_CHUNK = 1 * MiB


def resolved_folders(folders) -> list[Path]:
    """The allowed folders as real paths (links resolved); each must be a folder."""
    out = []
    for folder in folders:
        path = Path(folder).expanduser().resolve()
        if not path.is_dir():
            raise ViewerError(f"--allow-folder {folder} is not a folder")
        out.append(path)
    return out


def check_allowed(path: Path, folders: list[Path] | None) -> Path:
    """``path`` resolved, if it lies in one of ``folders`` (None: any path, as in tests of the
    session alone); else the page's one line saying which folders may be opened."""
    real = Path(path).expanduser().resolve()
    if folders is None or any(real == f or f in real.parents for f in folders):
        return real
    given = ", ".join(str(f) for f in folders) or "none"
    raise ViewerError(f"{path} is not in a folder this viewer may open (given when it was started: {given}); "
                      "upload the scan instead, or restart the viewer with --allow-folder")


def check_openable(path: Path) -> os.stat_result:
    """Stat ``path`` without opening it: a regular file or a folder passes, anything else (a
    FIFO, a socket, a device) is refused before a read could block."""
    try:
        info = os.stat(path)
    except OSError as exc:
        raise ViewerError(f"cannot open {path}: {exc.strerror or one_line(exc)}") from None
    if not (stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode)):
        raise ViewerError(f"{path} is not a regular file or a folder (a pipe, socket or device); "
                          "give a scan file, a DICOM folder or a worklist folder")
    if stat.S_ISDIR(info.st_mode):  # a DICOM folder: every file in it is read
        try:
            entries = list(os.scandir(path))
        except OSError as exc:
            raise ViewerError(f"cannot list {path}: {exc.strerror or one_line(exc)}") from None
        for entry in entries:
            try:
                mode = os.stat(entry.path).st_mode
            except OSError:
                continue  # a dangling link: the reader skips it
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise ViewerError(f"{path} holds {entry.name}, which is not a regular file (a pipe, socket or "
                                  "device); a DICOM folder must hold the series' files only")
    return info


def safe_upload_name(name: str) -> str:
    """An uploaded file's name as kept on the server: its last part, letters, digits and
    ``._-`` only, at most :data:`MAX_NAME_CHARS` long with its suffix (.nii.gz, .zip) kept."""
    base = re.sub(r"[^A-Za-z0-9._-]", "_", Path(str(name)).name).lstrip(".") or "upload"
    if len(base) <= MAX_NAME_CHARS:
        return base
    stem, dot, suffix = base.partition(".")
    suffix = (dot + suffix)[-20:]
    return stem[: MAX_NAME_CHARS - len(suffix)] + suffix


def extract_zip(archive: Path, target: Path, label: str) -> Path:
    """Unpack ``archive`` into ``target`` within the bounds; the first bound crossed, a link
    or a member leaving ``target`` is refused (the caller removes what was written)."""
    try:
        with zipfile.ZipFile(archive) as z:
            members = z.infolist()
            if len(members) > MAX_MEMBERS:
                raise ViewerError(f"{label} holds {len(members)} files, more than the {MAX_MEMBERS} an uploaded "
                                  "zip may hold; upload one series per zip")
            declared = sum(m.file_size for m in members)
            if declared > MAX_EXTRACTED_BYTES:
                raise ViewerError(f"{label} unpacks to {declared / MiB:.0f} MB, more than the "
                                  f"{MAX_EXTRACTED_BYTES // MiB} MB an uploaded zip may hold; upload one series per zip")
            root = target.resolve()
            written = 0
            for member in members:
                if stat.S_ISLNK(member.external_attr >> 16):
                    raise ViewerError(f"{label} holds a link ({member.filename}); a zip of a series must hold "
                                      "its files only")
                dest = (root / member.filename).resolve()
                if dest != root and root not in dest.parents:
                    raise ViewerError(f"{label} holds {member.filename}, which would leave its folder")
                if member.is_dir():
                    dest.mkdir(parents=True, exist_ok=True)
                    continue
                dest.parent.mkdir(parents=True, exist_ok=True)
                with z.open(member) as source, open(dest, "wb") as out:
                    while chunk := source.read(_CHUNK):
                        written += len(chunk)
                        if written > MAX_EXTRACTED_BYTES:
                            raise ViewerError(f"{label} unpacks to more than the {MAX_EXTRACTED_BYTES // MiB} MB "
                                              "an uploaded zip may hold; upload one series per zip")
                        out.write(chunk)
    except (zipfile.BadZipFile, EOFError, zipfile.LargeZipFile, NotImplementedError):
        raise ViewerError(f"{label} is not a readable zip archive") from None
    except RuntimeError as exc:  # an encrypted member
        raise ViewerError(f"{label} cannot be unpacked: {one_line(exc)}") from None
    return target
