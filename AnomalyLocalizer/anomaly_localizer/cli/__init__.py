"""The ``anomaly-localizer`` command: one module per command group, each with its parsers
and run functions (``register(sub)``), sharing :mod:`.common` options and progress.

Exit codes: 0 success; 2 bad input, model or options (one line on stderr saying what was
wrong and what to do; no output written); 3 cancelled; 1 an unexpected error (a bug: the
traceback is printed). Progress goes to stderr as lines ``PROGRESS <percent> <message>``,
which the Slicer module reads from its child process.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from .. import __version__
from ..errors import AnomalyLocalizerError, CancelledError
from .common import EXIT_CANCELLED, EXIT_INPUT

# Command groups, in the order ``--help`` lists them.
GROUPS = ("score", "screen", "train", "calibrate", "evaluate", "release", "demo")


def build_parser() -> argparse.ArgumentParser:
    import importlib

    p = argparse.ArgumentParser(prog="anomaly-localizer",
                                description="Unsupervised anomaly localisation in brain MRI.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)
    for name in GROUPS:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return p


def _stop(signum, frame) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    # SIGTERM (a job scheduler, the Slicer module's Cancel) and SIGHUP (a closed terminal) stop
    # the run like Ctrl-C: what was half written is removed, and the exit code is 3.
    previous = {}
    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is not None:
            try:
                previous[sig] = signal.signal(sig, _stop)
            except ValueError:  # not the main thread (e.g. called from a worker): leave them be
                pass
    try:
        parser = build_parser()  # imports torch and the engine: Ctrl-C here is a cancel too
        args = parser.parse_args(argv)
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                            format="%(levelname)s: %(message)s", stream=sys.stderr)
        return args.func(args)
    except CancelledError as exc:
        print(f"cancelled: {exc}", file=sys.stderr)
        return EXIT_CANCELLED
    except AnomalyLocalizerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt as exc:
        print(f"cancelled: {'interrupted' if not exc.args else f'stopped by {exc.args[0]}'}", file=sys.stderr)
        return EXIT_CANCELLED
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
