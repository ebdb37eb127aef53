"""What every command shares: exit codes, options, the progress printer, run records."""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
from typing import Callable

EXIT_OK, EXIT_BUG, EXIT_INPUT, EXIT_CANCELLED = 0, 1, 2, 3


def time_left(fraction: float, elapsed: float) -> str:
    """The suffix " (about N s left)" from the share done so far, once there is enough to go on."""
    if fraction < 0.05 or fraction >= 1.0 or elapsed < 2.0:
        return ""
    left = elapsed * (1 - fraction) / fraction
    return f" (about {left:.0f} s left)" if left < 120 else f" (about {left / 60:.0f} min left)"


def progress_printer(quiet: bool) -> Callable[[float, str], None]:
    """Progress as ``PROGRESS <percent> <message>`` lines on stderr (read by the Slicer
    module), with the time left estimated from the share of the work done."""
    import time
    start = time.perf_counter()

    def report(fraction: float, message: str) -> None:
        if not quiet:
            eta = time_left(fraction, time.perf_counter() - start)
            print(f"PROGRESS {100 * fraction:5.1f} {message}{eta}", file=sys.stderr, flush=True)
    return report


def say(quiet: bool) -> Callable[[str], None] | None:
    """A line printer for long commands' messages on stderr, None when quiet."""
    return None if quiet else (lambda m: print(m, file=sys.stderr, flush=True))


def add_device(parser: argparse.ArgumentParser, default: str = "auto") -> None:
    from ..core.device import DEVICES
    parser.add_argument("--device", default=default, choices=DEVICES,
                        help=f"compute device (default: {'the best available' if default == 'auto' else default})")


def add_quiet(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress messages")


def add_select_cases(parser: argparse.ArgumentParser, role: str) -> None:
    """--select-cases and its companions: real cases with a ground truth for a choice made
    on validation cases (``fuse``, ``scan-relative``); ``role`` says what they do there."""
    parser.add_argument("--select-cases", metavar="FOLDER",
                        help=f"real cases with a ground truth (one sub-folder each), which {role}; "
                             "cases used here are no longer held out")
    parser.add_argument("--select-ids", type=lambda v: [x for x in v.split(",") if x], metavar="ID1,ID2",
                        help="with --select-cases: only these case folders (the others stay held out for evaluation)")
    parser.add_argument("--image-name", default="image.nii.gz", help="with --select-cases: the image in each case folder")
    parser.add_argument("--label-name", default="label.nii.gz", help="with --select-cases: the ground truth (> 0)")
    parser.add_argument("--mask-name", help="with --select-cases: the brain mask in each case folder")


def select_cases_of(args: argparse.Namespace) -> list | None:
    """The real cases :func:`add_select_cases` named, loaded and checked before any scoring."""
    from ..errors import InputError
    from ..tooling.release.fusion import selection_cases
    if args.select_ids and not args.select_cases:
        raise InputError("--select-ids names case folders of --select-cases; give both")
    return selection_cases(args.select_cases, args.select_ids, args.image_name, args.label_name,
                           args.mask_name) if args.select_cases else None


def add_subjects(parser: argparse.ArgumentParser, default: str, help: str) -> None:
    from ..tooling.release.edit import SUBJECT_SETS
    parser.add_argument("--subjects", default=default, choices=SUBJECT_SETS, help=help)


def command_line() -> str:
    return "anomaly-localizer " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def machine() -> str:
    import torch
    try:
        usable = len(os.sched_getaffinity(0))  # what this process may use (e.g. under taskset)
    except AttributeError:
        usable = os.cpu_count()
    cores = f"{os.cpu_count()} cores" if usable == os.cpu_count() else f"{usable} of {os.cpu_count()} cores"
    return f"{platform.machine()}, {cores}, torch {torch.__version__}"
