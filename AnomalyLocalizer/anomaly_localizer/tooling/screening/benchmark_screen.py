"""``anomaly-localizer benchmark-screen``: scans per minute of screening, in this process and
on a local Dask cluster, and whether the two worklists agree (they must: a scan's results do
not depend on where it ran). A command that prints figures, not a test."""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

from ...core.worklist import DONE
from .screen import ScreenOptions, default_workers, run_screening


def compare_worklists(a: list, b: list) -> dict:
    """Where two worklists of the same scans differ: order, status, top slice, and the
    largest relative difference of a scan-level score."""
    same_order = [(r.id, r.status, r.rank, r.top_slice) for r in a] == [(r.id, r.status, r.rank, r.top_slice)
                                                                          for r in b]
    by_id = {r.id: r for r in b}
    worst = 0.0
    for r in a:
        other = by_id.get(r.id)
        if r.status == DONE and other is not None and other.volume_score is not None and r.volume_score is not None:
            worst = max(worst, abs(r.volume_score - other.volume_score) / max(abs(other.volume_score), 1e-12))
    return {"same_ranking_status_and_top_slices": same_order, "max_relative_volume_score_difference": worst,
            "agree": same_order and worst < 1e-4}


def benchmark_screening(inputs: list[str], options: ScreenOptions, workers: int | None = None,
                        say: Callable[[str], None] | None = None) -> dict:
    """Screen the inputs twice from scratch (serially, then on ``workers`` local workers)."""
    workers = workers or default_workers()
    runs, worklists = {}, {}
    root = Path(tempfile.mkdtemp(prefix="anomaly-localizer-screen-bench-"))
    try:
        for label, n in (("serial (this process, every core)", 1), (f"local Dask cluster, {workers} workers", workers)):
            t0 = time.perf_counter()
            rows = run_screening(inputs, root / f"w{n}", options, workers=n)
            seconds = time.perf_counter() - t0
            done = sum(r.status == DONE for r in rows)
            runs[label] = {"scans": len(rows), "screened": done, "failed": len(rows) - done, "seconds": seconds,
                           "scans_per_minute": 60.0 * len(rows) / seconds if seconds > 0 else math.nan,
                           "errors": {r.id: r.error for r in rows if r.status != DONE}}
            worklists[label] = rows
            if say:
                say(f"{label}: {len(rows)} scans ({len(rows) - done} failed) in {seconds:.0f} s, "
                    f"{runs[label]['scans_per_minute']:.1f} scans/min")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    serial, parallel = worklists.values()
    return {"runs": runs, "comparison": compare_worklists(parallel, serial), "workers": workers,
            "model": options.model_name, "methods": list(options.methods)}
