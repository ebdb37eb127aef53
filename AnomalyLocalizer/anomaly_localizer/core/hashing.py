"""SHA-256 of package files, each file hashed once per run.

A run verifies a package when it is found and again when its network is loaded, and a fused
package verifies each component it names; choosing a model by contrast reads every installed
package. Within :func:`one_run` a file is hashed the first time and its digest reused while
the file is unchanged (same size, modification time and inode): each file is hashed once per
run, and a file changed during the run is hashed again (and refused if it no longer matches).
Outside a run every call hashes. The scope is a context variable: a thread (a Dask worker, a
Slicer timer) sees its own.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import os
from pathlib import Path
from typing import Iterator

_RUN: contextvars.ContextVar[dict | None] = contextvars.ContextVar("anomaly_localizer_run_hashes", default=None)


@contextlib.contextmanager
def one_run() -> Iterator[None]:
    """Hash each file at most once inside this block (nested blocks share the outer one's)."""
    token = _RUN.set({}) if _RUN.get() is None else None
    try:
        yield
    finally:
        if token is not None:
            _RUN.reset(token)


def _key(path: Path) -> tuple:
    st = os.stat(path)
    return (str(Path(path).resolve()), st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)


def known_digest(path: Path) -> str | None:
    """The digest this run already computed for ``path`` as it is now; None if none."""
    cache = _RUN.get()
    if cache is None:
        return None
    try:
        return cache.get(_key(path))
    except OSError:
        return None


def sha256_file(path: Path) -> str:
    """The file's SHA-256 (hex), hashed once per run (:func:`one_run`)."""
    cache = _RUN.get()
    key = _key(path) if cache is not None else None
    if key is not None and key in cache:
        return cache[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    digest = h.hexdigest()
    if key is not None:
        cache[key] = digest
    return digest


def sha256_bytes(data: bytes, path: Path | None = None) -> str:
    """SHA-256 of bytes just read from ``path``: the run's digest of that file when it is
    unchanged since it was hashed, else hashed now."""
    known = known_digest(path) if path is not None else None
    return known if known is not None else hashlib.sha256(data).hexdigest()
