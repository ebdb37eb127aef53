"""Screening: many scans scored into one ranked worklist, in this process or on a Dask
cluster (a local one of worker processes by default, or an existing one by address).

Each scan is scored by :func:`screen_one` exactly as ``score`` scores it and written into
``DIR/<id>/`` (all or nothing); the worklist files (:mod:`core.worklist`) are rewritten
atomically after every scan. A scan's failure becomes its row's error and never stops the
batch. A rerun skips a scan whose folder holds results made from the same content hash
(input and mask bytes, model manifest, options) and redoes failed scans when asked.

Workers read the model package from its folder themselves (safetensors and JSON, hashes
checked), so only file paths and small option records travel between processes; on a
cluster of several machines, inputs, models and DIR must be on a filesystem they share.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ...core import levels
from ...core.worklist import DONE, FAILED, PENDING, THUMBNAIL, WORKLIST_JSON, Row, read_worklist, write_worklist
from ...errors import AnomalyLocalizerError, InputError
from .screen_inputs import Scan, content_sha256, find_scans, scan_problem, shown
from .worklist_html import write_html

log = logging.getLogger(__name__)
Progress = Callable[[float, str], None]


@dataclass(frozen=True)
class ScreenOptions:
    """How every scan of a worklist is scored (the ``score`` command's options)."""

    model_path: str
    model_name: str
    manifest_sha256: str
    methods: tuple[str, ...]
    threshold: float | None = None
    threshold_level: float | None = None
    brain_extraction: str = "auto"
    device: str = "auto"

    def scan_key(self, content: str) -> str:
        """The content hash a rerun compares: the scan's bytes and everything that changes
        its results (not the device or the number of workers)."""
        what = {"content": content, "model": self.manifest_sha256, "methods": list(self.methods),
                "threshold": self.threshold, "threshold_level": self.threshold_level,
                "brain_extraction": self.brain_extraction}
        return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


_LOADED: dict[tuple[str, str, str], tuple] = {}  # per process: the model, loaded once


def _package_and_model(options: ScreenOptions):
    from ...core.device import select_device
    from ...core.package import load_package
    key = (options.model_path, options.manifest_sha256, options.device)
    if key not in _LOADED:
        package = load_package(options.model_path)
        if package.manifest_sha256 != options.manifest_sha256:
            raise InputError(f"model {options.model_path} changed while screening; start the screening again")
        _LOADED.clear()
        _LOADED[key] = (package, package.load_model(select_device(options.device)))
    return _LOADED[key]


def screen_one(scan: Scan, key: str, out: str, options: ScreenOptions, redo: bool = False) -> Row:
    """Score one scan (or study) into ``out/<id>`` exactly as ``score`` does
    (:func:`anomaly_localizer.core.scoring.score_study`) and return its worklist row. Never
    raises for a problem of the scan (it becomes the row's error); only an interruption
    propagates. Torch's thread count is the process's (set once by the command line, or per
    Dask worker by :func:`.screen_cluster.run_on_dask`), never changed here."""
    from ...core.scoring import score_study
    from .thumbnail import render_thumbnail, write_png

    t0 = time.perf_counter()
    row = Row(scan.id, scan.path, series=scan.series, mask=scan.mask, sha256=key)

    def annotate(result, package, chosen, study):
        primary = result.info["primary_slice_score"]
        per_slice = result.slice_scores.get(primary)
        top = int(np.nanargmax(per_slice)) if per_slice is not None and np.isfinite(per_slice).any() else None
        top_pct = (levels.percentile_of(package.calibration, primary, float(per_slice[top]))
                   if top is not None and primary in package.calibration.slice else None)
        screening = {"sha256": key, "scan_percentile": levels.volume_percentile(package.calibration,
                                                                                result.volume_score),
                     "scan_percentile_meaning": "share of the model's healthy calibration scans whose scan-level "
                                                "score is at most this scan's (percent)",
                     "top_slice": top, "top_slice_score": primary, "top_slice_percentile": top_pct,
                     "seconds": time.perf_counter() - t0}
        scale, _ = levels.level_scale(package.calibration, chosen.method, result.maps[chosen.method],
                                      result.brain_mask)

        def thumbnail(folder: Path, seg: np.ndarray, written: dict) -> None:
            # the top finding's peak slice, else the most anomalous slice
            findings = written.get("findings") or []
            where = findings[0]["peak_index_ijk"][result.axial_axis] if findings else top
            if where is not None:
                write_png(render_thumbnail(study.reference, result.maps[chosen.method] / scale, seg,
                                           result.brain_mask, where, chosen.level), folder / THUMBNAIL)
        return {"series": scan.series, "screening": screening}, thumbnail

    try:
        package, model = _package_and_model(options)
        written = score_study(scan.inputs(), Path(out) / scan.id, contrasts=list(scan.contrasts) or None,
                              model=package, methods=list(options.methods), mask=scan.mask,
                              brain_extraction=options.brain_extraction, threshold=options.threshold,
                              threshold_level=options.threshold_level, device=options.device, force=redo,
                              network=model, annotate=annotate)
        row = row_from_summary(row, written)
    except AnomalyLocalizerError as exc:
        row.status, row.error = FAILED, str(exc)
    except Exception as exc:  # a bug or a resource problem: recorded, and the batch goes on
        log.debug("screening %s failed", scan.id, exc_info=True)
        row.status, row.error = FAILED, f"unexpected error ({type(exc).__name__}: {str(exc)[:200]}); please report it"
    row.seconds = time.perf_counter() - t0
    return row


def row_from_summary(row: Row, summary: dict) -> Row:
    """The worklist row of a scan from its results' summary.json."""
    s = summary["screening"]
    volume = summary["volume_score"]["value"]
    return Row(row.id, row.input, DONE, None, s.get("scan_percentile"),
               volume if volume is not None and math.isfinite(volume) else None, s.get("top_slice"),
               s.get("top_slice_percentile"), summary.get("segmented_ml"), summary.get("brain_mask_source"),
               summary.get("note", ""), s.get("seconds"), row.series, row.mask, s["sha256"], "",
               findings=len(summary.get("findings", [])) if "findings" in summary else None,
               largest_finding_ml=max((f["volume_ml"] for f in summary.get("findings", [])), default=None))


def _screened_summary(folder: Path) -> dict | None:
    try:
        summary = json.loads((folder / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary.get("screening"), dict) else None


LOCK = ".screening.lock"  # held by the one run that writes into a worklist folder


def check_folder(out: Path) -> None:
    """Refuse a worklist folder that is a file, holds other files, or cannot be created."""
    from ...core.paths import check_out_name
    check_out_name(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file, not a folder; choose another output folder")
    if out.exists() and any(p.name != LOCK for p in out.iterdir()) and not (out / WORKLIST_JSON).is_file() \
            and not (out / LOCK).exists():
        raise InputError(f"--out {out} holds other files and no {WORKLIST_JSON}; give a new folder, or the folder of "
                         "an earlier screening to resume it")
    if not out.resolve().parent.is_dir():
        raise InputError(f"the folder {out.resolve().parent} that should hold {out.name} does not exist; create it")
    if not os.access(out.resolve().parent, os.W_OK | os.X_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise InputError(f"cannot write into {out} (permission denied); choose an --out folder you can write")
    if not out.exists():
        from ...core.results import probe_folder
        probe_folder(out.resolve().parent, out.name)


@contextlib.contextmanager
def worklist_lock(out: Path) -> Iterator[None]:
    """Hold the worklist folder ``out`` for this run: a second run into it at the same time
    is refused in one line instead of both writing (an advisory lock the system releases
    when the holder ends, however it ends). The lock file is removed when released; a run
    that locked a file another run had just removed sees it and is refused too."""
    path = out / LOCK
    handle = open(path, "a+")
    try:
        try:
            import fcntl
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # Windows
            import msvcrt
            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
        if os.stat(path).st_ino != os.fstat(handle.fileno()).st_ino:
            raise OSError("the lock file was replaced")
    except OSError:
        handle.close()
        raise InputError(f"another screening run is writing into {out} now; wait for it to finish (then rerun to "
                         "resume), or give another --out") from None
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        handle.close()  # closing releases the lock


def prepare_folder(out: Path) -> None:
    """Create the worklist folder (or keep an earlier one to resume) and remove what an
    interrupted run left half-written. Call while holding :func:`worklist_lock`."""
    remove_leftovers(out)


def remove_leftovers(out: Path) -> None:
    """Remove the hidden partial folders and files of unfinished writes in ``out``."""
    for leftover in out.glob(".*"):
        if ".partial-" in leftover.name or ".old-" in leftover.name:
            shutil.rmtree(leftover, ignore_errors=True)
        elif leftover.is_file() and leftover.name.startswith(".worklist."):  # an unfinished atomic write
            leftover.unlink(missing_ok=True)


def plan(scans: list[Scan], out: Path, options: ScreenOptions, retry_failed: bool,
         progress: Progress | None = None) -> tuple[dict[str, Row], list[tuple[Scan, str, bool]]]:
    """Every scan's row so far, and the (scan, key, redo) jobs still to run."""
    previous = {}
    if (out / WORKLIST_JSON).is_file():
        try:
            previous = {r.id: r for r in read_worklist(out).rows}
        except (OSError, ValueError, TypeError, KeyError) as exc:
            log.warning("the earlier worklist in %s could not be read (%s); scans are checked by their folders", out, exc)
    rows: dict[str, Row] = {}
    jobs = []
    said = -math.inf
    for i, scan in enumerate(scans):
        if progress and time.perf_counter() - said > 2.0:  # hashing is quick: a line now and then
            said = time.perf_counter()
            progress(0.0, f"checking what is already screened: {i}/{len(scans)} scans")
        problem = scan_problem(scan)
        if problem is not None:  # recorded with its reason; the batch goes on
            rows[scan.id] = Row(scan.id, shown(scan.path), FAILED, series=scan.series,
                                mask=shown(scan.mask) if scan.mask else None, error=problem)
            continue
        key = options.scan_key(content_sha256(scan))
        folder = out / scan.id
        summary = _screened_summary(folder) if folder.exists() else None
        old = previous.get(scan.id)
        pending = Row(scan.id, scan.path, PENDING, series=scan.series, mask=scan.mask, sha256=key)
        if summary is not None and summary["screening"].get("sha256") == key:
            rows[scan.id] = old if old is not None and old.status == DONE and old.sha256 == key \
                else row_from_summary(pending, summary)
        elif old is not None and old.status == FAILED and old.sha256 == key and not retry_failed:
            rows[scan.id] = old
        elif folder.exists() and summary is None and any(folder.iterdir()):
            rows[scan.id] = Row(scan.id, scan.path, FAILED, series=scan.series, mask=scan.mask, sha256=key,
                                error=f"{folder} exists and is not a screening result; move it away and rerun")
        else:
            rows[scan.id] = pending
            jobs.append((scan, key, folder.exists()))
    return rows, jobs


def earlier_ids(out: Path) -> dict[tuple[str, str | None], str]:
    """The ids an earlier worklist in ``out`` gave its scans, by (path, DICOM series)."""
    try:
        return {(r.input, r.series): r.id for r in read_worklist(out).rows}
    except (OSError, ValueError, TypeError, KeyError):
        return {}


def default_workers() -> int:
    """Worker processes of a local cluster: one per core this process may use."""
    from ...core.device import usable_cores
    return usable_cores()


# What makes an earlier worklist's results comparable with a new run's.
_SAME_RESULTS = ("manifest_sha256", "methods", "threshold", "threshold_level", "brain_extraction")


def check_same_options(out: Path, options: ScreenOptions, force: bool) -> None:
    """Refuse to resume a worklist screened with another model or other options unless
    ``force``: its results would be replaced scan by scan."""
    try:
        earlier = read_worklist(out).options
    except (OSError, ValueError, TypeError, KeyError):
        return
    now = {**asdict(options), "methods": list(options.methods)}
    differ = [k for k in _SAME_RESULTS if k in earlier and earlier[k] != now[k]]
    if differ and not force:
        raise InputError(f"{out} holds a worklist screened with other {', '.join(differ)} (model "
                         f"{earlier.get('model_name')}, methods {', '.join(earlier.get('methods', []))}); give a new "
                         "--out, or pass --force to screen every scan again with these options")


def run_screening(inputs: list[str], out: Path, options: ScreenOptions, workers: int | None = None,
                  cluster: str | None = None, retry_failed: bool = False, progress: Progress | None = None,
                  say: Callable[[str], None] | None = None, force: bool = False, studies: bool = False) -> list[Row]:
    """Screen every scan the inputs name into ``out``; return the ranked rows.
    ``workers`` 1 (and no ``cluster``) scores in this process; otherwise on Dask. An earlier
    worklist in ``out`` is resumed; one made with other options only with ``force``.
    ``studies``: each sub-folder of a folder input is one study of several scans."""
    out = Path(out)
    check_folder(out)
    if cluster is None and workers is not None and workers > default_workers():
        log.warning("--workers %d is more than the %d cores this run may use; %d workers are used (more would only "
                    "compete for the cores)", workers, default_workers(), default_workers())
        workers = default_workers()
    known: dict[tuple[str, str | None], str] = {}
    if (out / WORKLIST_JSON).is_file():
        check_same_options(out, options, force)
        known = earlier_ids(out)
    scans, messages = find_scans(inputs, exclude=out, known=known, studies=studies)
    gone = len(set(known) - {(s.path, s.series) for s in scans})
    if gone:
        messages.append(f"{gone} scan(s) of the earlier worklist are not among the inputs now; their folders are kept "
                        "and left out of the worklist")
    for m in messages:
        if say:
            say(f"note: {m}")
    if not scans:
        raise InputError("no scans found in the inputs; give image files, folders holding NIfTI/NRRD/MHA files "
                         "or DICOM series, or a CSV list with a 'path' column")
    client = None
    if cluster is not None:  # an address that is wrong or silent is refused before the folder is made
        from .screen_cluster import connect
        client = connect(cluster)
    created = not out.exists()
    try:
        out.mkdir(exist_ok=True)
        with worklist_lock(out):
            try:
                return _screen_locked(scans, inputs, out, options, workers, cluster, retry_failed, progress, say,
                                      client)
            except BaseException:
                if created and {p.name for p in out.iterdir()} <= {LOCK}:
                    shutil.rmtree(out, ignore_errors=True)  # a run that wrote nothing leaves no folder
                raise
    except BaseException:
        if client is not None:
            client.close()
        raise


def _screen_locked(scans: list[Scan], inputs: list[str], out: Path, options: ScreenOptions, workers: int | None,
                   cluster: str | None, retry_failed: bool, progress: Progress | None,
                   say: Callable[[str], None] | None, client) -> list[Row]:
    """:func:`run_screening` once the worklist folder is held."""
    prepare_folder(out)
    rows, jobs = plan(scans, out, options, retry_failed, progress)
    order = [s.id for s in scans]
    record = {**asdict(options), "methods": list(options.methods), "inputs": [shown(str(Path(i).resolve())) for i in inputs]}

    def save() -> list[Row]:
        ranked = write_worklist(out, [rows[i] for i in order], record)
        write_html(out, ranked, record)
        return ranked

    save()
    skipped = len(scans) - len(jobs)
    if say and skipped:
        say(f"{skipped} of {len(scans)} scans already screened (or failed; --retry-failed redoes those)")
    start, done, failed = time.perf_counter(), 0, 0

    def finished(row: Row) -> None:
        nonlocal done, failed
        rows[row.id] = row
        done += 1
        failed += row.status == FAILED
        save()
        if progress:
            progress(done / max(1, len(jobs)), f"screened {done}/{len(jobs)} ({failed} failed) - {row.id}: "
                     + (row.error[:120] if row.status == FAILED else f"{row.seconds:.1f} s"))
    try:
        if not jobs:
            pass
        elif cluster is None and (workers or default_workers()) == 1:
            for scan, key, redo in jobs:
                finished(screen_one(scan, key, str(out), options, redo))
        else:
            from .screen_cluster import run_on_dask
            n = workers or default_workers()
            # On a local cluster each worker runs one scan at a time: its share of the cores.
            threads = None if cluster else max(1, default_workers() // n)
            run_on_dask(screen_one, jobs, str(out), options, finished, n, threads, cluster, say, client)
            client = None
    finally:
        if client is not None:  # connected, but nothing was left to screen
            client.close()
        for sid, row in list(rows.items()):  # written just before an interruption, not yet recorded
            if row.status == PENDING:
                summary = _screened_summary(out / sid)
                if summary is not None and summary["screening"].get("sha256") == row.sha256:
                    rows[sid] = row_from_summary(row, summary)
        ranked = save()
        remove_leftovers(out)  # a worker stopped while writing leaves its hidden partial folder
    if say and jobs:
        say(f"screened {done} scans in {time.perf_counter() - start:.0f} s ({failed} failed); "
            f"worklist: {out / 'worklist.html'}")
    return ranked
