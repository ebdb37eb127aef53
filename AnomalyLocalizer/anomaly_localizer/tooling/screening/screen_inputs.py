"""What a screening run scores: scans found in files, folders and CSV lists, each with a
stable id (its results folder's name) and a content hash.

- An image file (NIfTI, NRRD, MHA/MHD) is one scan.
- A folder is searched recursively: every image file is one scan, and every DICOM series
  (by series instance UID, per folder) is one scan. Files whose names say they are masks or
  labels (``*mask*``, ``*seg*``, ``*label*`` as a word of the name) are not scans; give masks
  through a CSV.
- A CSV file lists scans in a ``path`` column, with optional ``mask`` and ``id`` columns;
  relative paths are relative to the CSV file's folder. A row is a study of several
  co-registered scans when it has ``path_2`` (``path_3``, ...) columns, each scan's contrast
  optionally in ``contrast`` (``contrast_2``, ...); maps go on the first scan's grid.
- With ``studies``, every sub-folder of a folder is one study: its image files and DICOM
  series (in name order, the first the reference) are scored together, their contrasts
  recognised (:mod:`anomaly_localizer.core.study`).
"""

from __future__ import annotations

import csv
import hashlib
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ...core.imageio import dicom_series_files, dicom_series_in
from ...core.worklist import WORKLIST_CSV, WORKLIST_HTML, WORKLIST_JSON
from ...errors import InputError

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".hdr")
# Data files that belong to a header file: hashed with it, never scans of their own.
_DATA_SUFFIXES = (".img", ".img.gz", ".raw", ".zraw", ".raw.gz")
_NOT_SCANS = {"mask", "masks", "brainmask", "seg", "segmentation", "label", "labels", "labelmap"}
_SKIPPED_FILES = (".csv", ".json", ".txt", ".md", ".html", ".png", ".jpg", ".jpeg", ".pdf", ".xml", ".tsv",
                  ".py", ".sh", ".log")

RESERVED_NAMES = (WORKLIST_JSON, WORKLIST_CSV, WORKLIST_HTML)  # never a scan's folder name


@dataclass(frozen=True)
class Scan:
    """One scan to screen: an image file, or one DICOM series of a folder."""

    id: str
    path: str
    series: str | None = None  # DICOM series instance UID when ``path`` is a folder
    mask: str | None = None
    more: tuple[tuple[str, str | None], ...] = ()  # a study's further scans: (path, DICOM series)
    contrasts: tuple[str | None, ...] = ()  # given contrasts, one per scan (None: recognise); () all recognised

    def label(self) -> str:
        return f"{self.path} (DICOM series {self.series})" if self.series else self.path

    def inputs(self) -> list[tuple[str, str | None]]:
        """Every scan of the study, the reference first."""
        return [(self.path, self.series), *self.more]


def _is_image(path: Path) -> bool:
    return path.name.lower().endswith(IMAGE_SUFFIXES)


def _stem(path: Path) -> str:
    name = path.name
    for suf in IMAGE_SUFFIXES:
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return name


def _names_a_mask(path: Path) -> bool:
    words = re.split(r"[^a-z0-9]+", _stem(path).lower())
    return any(w in _NOT_SCANS for w in words)


def safe_id(text: str) -> str:
    """A folder name from a scan's name: letters, digits, '.', '-' and '_' only."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._-")
    return cleaned[:120] or "scan"


def _search_folder(root: Path, exclude: Path | None) -> tuple[list[tuple[str, str, Scan]], int]:
    """(short name, name with its folders, scan) under ``root``, and the number of mask-like
    files left out."""
    found: list[tuple[str, str, Scan]] = []
    skipped = 0
    folders = [root] + sorted(p for p in root.rglob("*") if p.is_dir())
    for folder in folders:
        if exclude is not None and (folder == exclude or exclude in folder.parents):
            continue
        if any(part.startswith(".") for part in folder.relative_to(root).parts):
            continue  # hidden folders: e.g. a screening run's temporary folders
        files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
        rel = folder.relative_to(root)
        for f in files:
            if _is_image(f):
                if _names_a_mask(f):
                    skipped += 1
                    continue
                found.append((_stem(f), "_".join([*rel.parts, _stem(f)]), Scan("", str(f.resolve()))))
        others = [f for f in files if not _is_image(f) and not f.name.lower().endswith(_DATA_SUFFIXES + _SKIPPED_FILES)]
        if others:
            series = dicom_series_in(folder)
            for uid in series:
                tail = "" if len(series) == 1 else f"_{uid.rsplit('.', 1)[-1][-8:]}"
                found.append((folder.name + tail, "_".join(rel.parts or (root.name,)) + tail,
                              Scan("", str(folder.resolve()), series=uid)))
    return found, skipped


def _read_csv(path: Path) -> list[tuple[str, str, Scan]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            header = [(h or "").strip().lower() for h in (reader.fieldnames or [])]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"cannot read the list {path} ({exc}); give a CSV file with a 'path' column") from None
    if "path" not in header:
        raise InputError(f"the list {path} has no 'path' column (it has: {', '.join(header) or 'none'}); add a header "
                         "row with 'path' (and optionally 'mask' and 'id')")
    out: list[tuple[str, str, Scan]] = []
    line: list[int] = []
    for i, row in enumerate(rows, 2):
        if None in row:  # DictReader puts the fields beyond the header under None
            raise InputError(f"the list {path}, line {i}: {len(header) + len(row[None])} fields, but the header names "
                             f"{len(header)} ({', '.join(header)}); quote paths that hold commas, or remove the extra "
                             "fields")
        row = {(k or "").strip().lower(): (v or "").strip() for k, v in row.items()}
        if not row.get("path"):
            raise InputError(f"the list {path}, line {i}: the path is empty; give a file or DICOM folder")
        mask = str((path.parent / row["mask"]).resolve()) if row.get("mask") else None
        located = []
        for k, key in enumerate(["path"] + [f"path_{n}" for n in range(2, 10)]):
            if not row.get(key):
                break
            scan_path = (path.parent / row[key]).resolve()
            series = None
            if scan_path.is_dir():
                uids = dicom_series_in(scan_path)
                series = uids[0] if len(uids) == 1 else None  # several: the reader says so in the row
            located.append((str(scan_path), series, row.get("contrast" if k == 0 else f"contrast_{k + 1}") or None))
        name = row.get("id") or _stem(Path(located[0][0]))
        contrasts = tuple(c for _, _, c in located) if any(c for _, _, c in located) else ()
        out.append((name, name, Scan("", located[0][0], series=located[0][1], mask=mask,
                                     more=tuple((p, s) for p, s, _ in located[1:]), contrasts=contrasts)))
        line.append(i)
    seen: dict[tuple[str, str | None], int] = {}
    for (name, _, scan), i in zip(out, line):
        first = seen.setdefault((scan.path, scan.series), i)
        if first != i:
            earlier = out[line.index(first)]
            if earlier[2].mask != scan.mask or earlier[0] != name:
                raise InputError(f"the list {path}, line {i}: the scan of line {first} again, with another "
                                 f"{'mask' if earlier[2].mask != scan.mask else 'id'}; list each scan once")
    return out


def _studies_in(root: Path, exclude: Path | None) -> tuple[list[tuple[str, str, Scan]], list[str]]:
    """One study per sub-folder of ``root``: its scans (image files and DICOM series, mask-like
    names left out) in name order, the first the reference."""
    found, messages = [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if exclude is not None and (folder == exclude or exclude in folder.parents):
            continue
        scans, _ = _search_folder(folder, None)
        if not scans:
            messages.append(f"{folder}: no image files or DICOM series found; not a study")
            continue
        parts = [(sc.path, sc.series) for _, _, sc in sorted(scans, key=lambda t: (t[2].path, t[2].series or ""))]
        found.append((folder.name, "_".join([root.name, folder.name]),
                      Scan("", parts[0][0], series=parts[0][1], more=tuple(parts[1:]))))
    return found, messages


def find_scans(inputs: list[str], exclude: Path | None = None,
               known: dict[tuple[str, str | None], str] | None = None,
               studies: bool = False) -> tuple[list[Scan], list[str]]:
    """Every scan the inputs name, with unique ids, in a stable order; and messages about
    what was left out. A path that does not exist is refused before any work. ``known``:
    the ids an earlier run gave scans ((path, series) -> id); those scans keep them, so a
    rerun with inputs added or removed never renames a screened scan's folder. ``studies``:
    every sub-folder of a folder input is one study of several scans (:func:`_studies_in`)."""
    pairs: list[tuple[str, str, Scan]] = []
    messages: list[str] = []
    exclude = exclude.resolve() if exclude is not None else None
    for given in inputs:
        p = Path(given)
        if not p.exists():
            raise InputError(f"INPUT {given} does not exist; give image files, folders or a CSV list")
        if p.is_file() and p.suffix.lower() == ".csv":
            pairs += _read_csv(p)
        elif p.is_file():
            pairs.append((_stem(p), _stem(p), Scan("", str(p.resolve()))))
        elif studies:
            found, notes = _studies_in(p.resolve(), exclude)
            messages += notes
            if not found:
                messages.append(f"{given}: no sub-folder holds a study")
            pairs += found
        else:
            found, skipped = _search_folder(p.resolve(), exclude)
            if skipped:
                messages.append(f"{given}: {skipped} file(s) named like masks or labels are not scans (give masks "
                                "in a CSV 'mask' column)")
            if not found:
                messages.append(f"{given}: no image files or DICOM series found")
            pairs += found
    unique, seen = [], set()
    for short, long, scan in pairs:
        if (scan.path, scan.series) not in seen:
            seen.add((scan.path, scan.series))
            unique.append((short, long, scan))
    # A scan is named by its file (or DICOM folder) alone, unless another scan has that name:
    # then by its folders too; a number tells apart what is still the same.
    shorts = [safe_id(short).lower() for short, _, _ in unique]
    counts = Counter(shorts)
    used: set[str] = {n.lower() for n in RESERVED_NAMES}
    kept = {}
    for _, _, scan in unique:
        old = (known or {}).get((scan.path, scan.series))
        if old and safe_id(old) == old and old.lower() not in used:
            kept[(scan.path, scan.series)] = old
            used.add(old.lower())
    used |= {i.lower() for (p, s), i in (known or {}).items() if i}  # a removed scan's folder is not reused
    scans = []
    for (short, long, scan), key in zip(unique, shorts):
        if (scan.path, scan.series) in kept:
            scans.append(Scan(kept[(scan.path, scan.series)], scan.path, scan.series, scan.mask, scan.more,
                              scan.contrasts))
            continue
        base = safe_id(short) if counts[key] == 1 else safe_id(long)
        sid, n = base, 2
        while sid.lower() in used:  # case-insensitive: folders on macOS and Windows
            sid, n = f"{base}-{n}", n + 1
        used.add(sid.lower())
        scans.append(Scan(sid, scan.path, scan.series, scan.mask, scan.more, scan.contrasts))
    return scans, messages


def scan_problem(scan: Scan) -> str | None:
    """Why a scan cannot be read at all, said in its worklist row instead of stopping the
    batch: a name that is not UTF-8 text (in its path, a DICOM folder's files or its mask),
    or something that is neither a file nor a folder (a FIFO would block for ever)."""
    from ...core.paths import check_name, check_readable_kind, undecodable_entry
    try:
        for where, _ in scan.inputs():
            check_name(where, "INPUT")
            check_readable_kind(where, "INPUT")
            if Path(where).is_dir():
                odd = undecodable_entry(Path(where))
                if odd is not None:
                    return (f"INPUT folder {shown(where)} holds a file whose name is not UTF-8 text ({odd}); rename it "
                            "or move it out of the folder")
        if scan.mask:
            check_name(scan.mask, "MASK")
            check_readable_kind(scan.mask, "MASK")
    except InputError as exc:
        return str(exc)
    return None


def shown(path: str) -> str:
    from ...core.paths import shown as _shown
    return _shown(path)


def _hash_file(h, path: Path) -> None:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)


def content_sha256(scan: Scan) -> str:
    """SHA-256 of what the scan's voxels are read from: the file (with a header's data
    file), or the series' files in slice order; and the mask's. Unreadable parts hash
    their error, so a scan that cannot be read still gets a stable key."""
    h = hashlib.sha256()
    try:
        for n, (where, uid) in enumerate(scan.inputs()):
            path = Path(where)
            if n:  # a study's further scans, and the contrasts given (the first scan alone hashes as before)
                h.update(f"scan {n}\0".encode())
            if uid:
                files = [Path(f) for f in dicom_series_files(path, uid)]
            elif path.is_dir():
                files = sorted(p for p in path.iterdir() if p.is_file())
            else:
                files = [path] + [path.with_name(_stem(path) + s) for s in _DATA_SUFFIXES
                                  if path.with_name(_stem(path) + s).is_file()]
            for f in files:
                h.update(f.name.encode() + b"\0")
                _hash_file(h, f)
        if scan.contrasts:
            h.update(("contrasts " + ",".join(c or "-" for c in scan.contrasts)).encode())
        if scan.mask:
            h.update(b"mask\0")
            _hash_file(h, Path(scan.mask))
    except OSError as exc:
        h.update(f"unreadable: {exc.strerror}".encode())
    except (TypeError, UnicodeError) as exc:  # a file name that is not UTF-8 text
        h.update(f"unreadable: {type(exc).__name__}".encode())
    return h.hexdigest()
