"""A screening worklist: one row per scan, ranked most anomalous first, and its files.

``DIR/worklist.json`` is the record (the options the scans were screened with and every
row, pending and failed ones too); ``DIR/worklist.csv`` the same rows as a table. Both are
written to a temporary file and renamed into place, so an interruption never leaves half a
worklist. Each screened scan's results folder is ``DIR/<id>/`` (as ``score`` writes it), and
its ``summary.json`` holds the row's figures under ``"screening"``, so a row can always be
rebuilt from its folder. The Slicer module and the HTML report read the same files.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

WORKLIST_JSON = "worklist.json"
WORKLIST_CSV = "worklist.csv"
WORKLIST_HTML = "worklist.html"
THUMBNAIL = "thumbnail.png"
FORMAT = 1

# Row statuses: screened, could not be screened (the error says why), not yet screened.
DONE, FAILED, PENDING = "done", "failed", "pending"


@dataclass
class Row:
    """One scan of a worklist. Figures are None until the scan is screened."""

    id: str  # the scan's results folder name inside the worklist folder
    input: str  # the file, DICOM folder or CSV entry it came from
    status: str = PENDING
    rank: int | None = None  # 1 = most anomalous; None for pending and failed scans
    scan_percentile: float | None = None  # healthy percentile of the scan-level score
    volume_score: float | None = None  # the model's scan-level score (raw)
    top_slice: int | None = None  # most anomalous slice, index along the input's axial axis
    top_slice_percentile: float | None = None  # its slice score's healthy percentile
    segmented_ml: float | None = None
    brain_mask_source: str | None = None
    note: str = ""
    seconds: float | None = None
    series: str | None = None  # DICOM series instance UID, for a folder's series
    mask: str | None = None
    sha256: str = ""  # content hash of input, mask, model and options: what a rerun compares
    error: str = ""
    findings: int | None = None  # connected regions of the segmentation (core.findings)
    largest_finding_ml: float | None = None


COLUMNS = [f.name for f in fields(Row)]
CSV_COLUMNS = ["rank", "id", "status", "scan_percentile", "volume_score", "top_slice", "top_slice_percentile",
               "segmented_ml", "findings", "largest_finding_ml", "brain_mask_source", "note", "seconds", "input",
               "series", "mask", "error", "sha256"]


def rank_rows(rows: list[Row]) -> list[Row]:
    """Screened scans first, most anomalous first (by the scan-level score, which orders
    them exactly as its healthy percentile does and also orders scans above every healthy
    one), then failed, then pending scans, each in input order. Sets ``rank``."""
    def anomalous(r: Row) -> float:
        v = r.volume_score
        return -v if v is not None and math.isfinite(v) else math.inf
    done = sorted((r for r in rows if r.status == DONE), key=anomalous)
    for i, r in enumerate(done, 1):
        r.rank = i
    rest = [r for r in rows if r.status == FAILED] + [r for r in rows if r.status not in (DONE, FAILED)]
    for r in rest:
        r.rank = None
    return done + rest


def atomic_write(path: Path, text: str) -> None:
    from .paths import new_file
    fd, tmp = new_file(path.parent, f".{path.name}.")  # the user's umask applies, as to any new file
    try:
        with os.fdopen(fd, "w", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def worklist_csv(rows: list[Row]) -> str:
    out = io.StringIO()
    w = csv.writer(out)
    w.writerow(CSV_COLUMNS)
    for r in rows:
        d = asdict(r)
        w.writerow([_cell(d[c]) for c in CSV_COLUMNS])
    return out.getvalue()


def write_worklist(folder: Path, rows: list[Row], options: dict[str, Any]) -> list[Row]:
    """Rank ``rows`` and write worklist.json and worklist.csv into ``folder`` (each
    atomically); return the ranked rows."""
    rows = rank_rows(rows)
    record = {"format": FORMAT, "options": options, "rows": [asdict(r) for r in rows],
              "counts": {s: sum(r.status == s for r in rows) for s in (DONE, FAILED, PENDING)}}
    atomic_write(folder / WORKLIST_JSON, json.dumps(record, indent=1, allow_nan=False) + "\n")
    atomic_write(folder / WORKLIST_CSV, worklist_csv(rows))
    return rows


@dataclass
class Worklist:
    folder: Path
    options: dict[str, Any]
    rows: list[Row]

    def screened(self) -> list[Row]:
        """Screened rows in rank order."""
        return [r for r in self.rows if r.status == DONE]


def find_worklist(path: str | os.PathLike) -> Path:
    """The worklist folder of ``path``: the folder itself or one of its worklist files."""
    path = Path(path)
    folder = path.parent if path.is_file() else path
    if not (folder / WORKLIST_JSON).is_file():
        raise FileNotFoundError(f"{path} is not a screening worklist (no {WORKLIST_JSON}); give the folder "
                                "`anomaly-localizer screen --out` wrote")
    return folder


def read_worklist(path: str | os.PathLike) -> Worklist:
    """Read a worklist folder (or its worklist.json / worklist.csv / worklist.html)."""
    folder = find_worklist(path)
    try:
        record = json.loads((folder / WORKLIST_JSON).read_text(encoding="utf-8"))
    except RecursionError:
        raise ValueError(f"{folder / WORKLIST_JSON} is nested too deeply to be a worklist; it was edited or damaged. "
                         "Screen again into a new folder") from None
    except UnicodeDecodeError:
        raise ValueError(f"{folder / WORKLIST_JSON} is not UTF-8 text; it was edited or damaged. Screen again into a "
                         "new folder") from None
    if not isinstance(record, dict):
        raise ValueError(f"{folder / WORKLIST_JSON} holds no worklist record; it was edited or damaged. Screen again "
                         "into a new folder")
    if record.get("format") != FORMAT:
        raise ValueError(f"{folder / WORKLIST_JSON} has format {record.get('format')!r}; this engine reads {FORMAT}")
    if not isinstance(record.get("rows"), list) or not isinstance(record.get("options", {}), dict):
        raise ValueError(f"{folder / WORKLIST_JSON} has no list of rows; it was edited or damaged. Screen again into a "
                         "new folder")
    names = set(COLUMNS)
    rows = []
    for i, r in enumerate(record["rows"], 1):
        if not isinstance(r, dict):
            raise ValueError(f"{folder / WORKLIST_JSON}: row {i} is not a record; it was edited or damaged")
        row = Row(**{k: v for k, v in r.items() if k in names})
        problem = row_problem(row)
        if problem:
            raise ValueError(f"{folder / WORKLIST_JSON}: row {i} ({str(r.get('id'))[:60]}): {problem}; the file was "
                             "edited or damaged. Screen again into a new folder")
        rows.append(row)
    return Worklist(folder, record.get("options", {}), rank_rows(rows))


_NUMBERS = ("scan_percentile", "volume_score", "top_slice_percentile", "segmented_ml", "seconds",
            "largest_finding_ml")
_INTEGERS = ("rank", "top_slice", "findings")
_TEXTS = ("id", "input", "status", "note", "sha256", "error")
_OPTIONAL_TEXTS = ("brain_mask_source", "series", "mask")


def row_problem(row: Row) -> str | None:
    """What makes a row read from a file unusable (a field of the wrong type or an unknown
    status), or None."""
    for name in _NUMBERS:
        v = getattr(row, name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            return f"{name} is {v!r}, not a number"
    for name in _INTEGERS:
        v = getattr(row, name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            return f"{name} is {v!r}, not a whole number"
    for name in _TEXTS:
        if not isinstance(getattr(row, name), str):
            return f"{name} is {getattr(row, name)!r}, not text"
    for name in _OPTIONAL_TEXTS:
        v = getattr(row, name)
        if v is not None and not isinstance(v, str):
            return f"{name} is {v!r}, not text"
    if row.status not in (DONE, FAILED, PENDING):
        return f"status is {row.status!r}, not one of {DONE}, {FAILED}, {PENDING}"
    if not row.id or "/" in row.id or "\\" in row.id or row.id in (".", ".."):
        return f"id {row.id!r} is not a folder name"
    return None
