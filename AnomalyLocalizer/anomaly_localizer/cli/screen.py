"""``screen``: many scans into a ranked worklist (locally or on a Dask cluster)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import EXIT_OK, add_device, add_quiet, progress_printer, say


def register(sub) -> None:
    s = sub.add_parser("screen", help="score many scans into a ranked worklist (CSV and HTML)",
                       description="Score every scan the inputs name as `score` does, each into OUT/<id>/, and rank "
                                   "them most anomalous first in OUT/worklist.csv and OUT/worklist.html. A rerun into "
                                   "the same OUT skips scans already screened (by a content hash).")
    s.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image file, folder (searched recursively; each image file and each DICOM series is a scan; "
                        "files named like masks or labels are left out) or CSV list with a 'path' column and "
                        "optional 'mask' and 'id' columns")
    s.add_argument("--studies", action="store_true",
                   help="each sub-folder of a folder INPUT is one study: its scans (e.g. T1 and FLAIR) are scored "
                        "together, contrasts recognised, on the first one's grid (a CSV row is a study when it has "
                        "path_2, path_3 ... columns, with optional contrast, contrast_2 ...)")
    s.add_argument("--out", required=True, help="worklist folder: new, or an earlier screening's folder to resume")
    s.add_argument("--model", help="model name or package folder (default: the default installed model); one model "
                   "scores the whole worklist, and a scan of a contrast it does not read fails with advice")
    s.add_argument("--method", action="append", metavar="M",
                   help="pixel score, repeatable (default: the model's defaults); the first one ranks and segments")
    s.add_argument("--brain-extraction", default="auto", metavar="auto|off|MODEL",
                   help="for whole-head scans without a mask (as for score)")
    s.add_argument("--threshold", type=float, help="segmentation threshold as a raw score (as for score)")
    s.add_argument("--threshold-level", type=float, metavar="LEVEL", help="the threshold as an anomaly level")
    s.add_argument("--workers", type=int, metavar="N",
                   help="worker processes of the local Dask cluster (default: one per core); 1 screens in this "
                        "process without Dask")
    s.add_argument("--cluster", metavar="ADDRESS",
                   help="screen on an existing Dask cluster, e.g. tcp://scheduler:8786 (inputs, models and --out "
                        "on a filesystem every worker sees)")
    s.add_argument("--retry-failed", action="store_true", help="screen again the scans that failed last time")
    s.add_argument("--force", action="store_true",
                   help="resume an --out worklist made with another model or other options, screening every scan "
                        "again (without it, that is refused)")
    add_device(s)
    add_quiet(s)
    s.set_defaults(func=run_screen)


def run_screen(args: argparse.Namespace) -> int:
    from ..core.installed import check_methods, resolve_package_for
    from ..core.results import check_threshold_options
    from ..errors import InputError
    from ..tooling.screening.screen import ScreenOptions, run_screening

    if args.workers is not None and args.workers < 1:
        raise InputError(f"--workers {args.workers}: give 1 or more worker processes")
    if args.workers is not None and args.cluster:
        raise InputError("--workers sizes the local cluster; an existing --cluster has its own workers: give one")
    # Everything that can be refused is checked before any scan is scored.
    package = resolve_package_for(args.method, args.model)
    methods = check_methods(args.method or package.default_methods(), package)
    check_threshold_options(package, methods[0], args.threshold, args.threshold_level)
    options = ScreenOptions(str(package.path.resolve()), package.name, package.manifest_sha256, tuple(methods),
                            args.threshold, args.threshold_level, args.brain_extraction, args.device)
    rows = run_screening(args.inputs, Path(args.out), options, args.workers, args.cluster, args.retry_failed,
                         progress_printer(args.quiet), say(args.quiet), args.force, studies=args.studies)
    failed = [r for r in rows if r.status == "failed"]
    if not args.quiet:
        for r in rows[:10]:
            if r.status == "done":
                pct = "" if r.scan_percentile is None else f"{r.scan_percentile:5.1f} %"
                print(f"{r.rank:>4}  {pct:>8}  {r.id}")
    for r in failed:
        print(f"failed: {r.id}: {r.error}")
    return EXIT_OK
