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
import textwrap

from .. import __version__
from ..errors import AnomalyLocalizerError, CancelledError
from .common import EXIT_CANCELLED, EXIT_INPUT

# Modules that register commands (one per command group).
GROUPS = ("score", "screen", "train", "calibrate", "evaluate", "release", "demo")
# Commands of layers above the engine (the browser viewer) register through this entry point
# group, so that the engine never imports them.
PLUGIN_GROUP = "anomaly_localizer.commands"
# How ``--help`` lists the commands: what users run first, then making and measuring models.
HELP_SECTIONS = {
    "Reading scans": ("score", "screen", "view", "models", "demo", "compare-worklists"),
    "Making models (training, calibration, release)": (
        "render", "train", "train-lsr", "train-dae", "train-ssl", "train-tissue", "train-brainmask", "calibrate",
        "standardise", "scan-relative", "tune-restoration", "tune-smoothing", "release", "join-folds", "fuse",
        "make-rule", "index", "card"),
    "Measuring models": ("evaluate", "fpr", "unfamiliar-scans", "brainmask-dice", "benchmark", "benchmark-screen",
                         "paper-fmnist"),
}


def _grouped_commands(sub) -> str:
    """The commands under their section headings, each with its one-line help."""
    helps = {a.dest: a.help or "" for a in sub._choices_actions}
    listed = [c for names in HELP_SECTIONS.values() for c in names]
    others = [c for c in helps if c not in listed]  # a plugin's command no section names
    lines = []
    for title, names in [*HELP_SECTIONS.items(), *([("Other", others)] if others else [])]:
        lines.append(f"{title}:")
        lines += [textwrap.fill(helps[name], width=100, initial_indent=f"  {name:<20}", subsequent_indent=" " * 22)
                  for name in names if name in helps]  # a plugin command may not be installed
        lines.append("")
    return "\n".join(lines) + "anomaly-localizer COMMAND --help says what a command takes."


def _plugins() -> list:
    """The ``register`` functions of installed plugin commands (a broken one is skipped with a
    warning: the engine's own commands must keep working)."""
    from importlib.metadata import entry_points
    found = []
    points = entry_points()
    # Python 3.9 (Slicer 5.8) has no select(): there entry_points() is a dict of groups
    group = points.select(group=PLUGIN_GROUP) if hasattr(points, "select") else points.get(PLUGIN_GROUP, [])
    for point in group:
        try:
            found.append(point.load())
        except Exception as exc:  # noqa: BLE001 - any import failure of a plugin
            logging.getLogger(__name__).warning("command %s is unavailable: %s", point.name, exc)
    return found


class OneLineParser(argparse.ArgumentParser):
    """argparse's refusal in one line (its usage block is what --help is for)."""

    def error(self, message: str):
        self.exit(EXIT_INPUT, f"error: {self.prog}: {message}; see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    import importlib

    p = OneLineParser(prog="anomaly-localizer", formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="Unsupervised anomaly localisation in brain MRI.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", help="one of the commands below")
    for name in GROUPS:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    for register in _plugins():
        register(sub)
    p.epilog = _grouped_commands(sub)
    sub._choices_actions.clear()  # listed under their headings in the epilog instead of in one block
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
        from ..core.device import configure_threads
        configure_threads()  # process-wide: set here, by the entry point, never by library code
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
