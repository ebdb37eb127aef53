"""``calibrate``, ``fpr`` and the tuning commands (``tune-restoration``, ``tune-smoothing``,
``standardise``, ``scan-relative``): they change or check a model's thresholds and settings
on healthy scans."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import InputError
from .common import (
    EXIT_OK,
    add_device,
    add_quiet,
    add_select_cases,
    add_subjects,
    command_line,
    machine,
    say,
    select_cases_of,
)


def register(sub) -> None:
    c = sub.add_parser("calibrate", help="recalibrate a model's thresholds on healthy scans")
    c.add_argument("model", help="model name or folder")
    c.add_argument("data", help="folder of healthy scans")
    add_subjects(c, "all", "which scans of DATA: all, or the model's recorded subjects of that set")
    c.add_argument("--out", help="write a recalibrated copy here")
    c.add_argument("--in-place", action="store_true", help="overwrite the model's own calibration")
    c.add_argument("--findings-only", action="store_true",
                   help="keep the thresholds; only choose the finding rule of the recommended map on these scans")
    add_device(c)
    add_quiet(c)
    c.set_defaults(func=run_calibrate)

    f = sub.add_parser("fpr", help="share of healthy brain voxels the calibrated thresholds flag")
    f.add_argument("model", help="model name or folder")
    f.add_argument("data", help="folder of healthy scans")
    add_subjects(f, "test", "the model's held-back test subjects by default")
    add_device(f)
    f.add_argument("--json")
    add_quiet(f)
    f.set_defaults(func=run_fpr)

    h = sub.add_parser("standardise", help="map every scan's brain histogram onto the model's training scans' "
                                            "(histogram standardisation) and recalibrate")
    h.add_argument("model", help="model name or folder (not a fused model: standardise its components)")
    h.add_argument("data", help="the model's healthy data (its training subjects set the standard, its "
                   "calibration subjects the thresholds)")
    _add_change_arguments(h, "the standardised model")
    h.set_defaults(func=run_standardise)

    v = sub.add_parser("scan-relative",
                       help="make a method's map relative to each scan's own (divided by a quantile of it over the "
                            "brain), where that helps on validation cases, and recalibrate")
    v.add_argument("model", help="model name or folder")
    v.add_argument("data", help="the model's healthy data (its validation subjects choose, its calibration "
                   "subjects set the thresholds)")
    v.add_argument("--method", action="append", required=True,
                   help="the method whose map to change (repeatable; a fused model: fused only)")
    v.add_argument("--quantile", type=float,
                   help="use this brain quantile (0.05-0.95) instead of choosing one on validation cases")
    v.add_argument("--absolute", action="store_true", help="make the methods' maps absolute again")
    v.add_argument("--per-subject", type=int, default=2, help="validation cases per subject (default 2)")
    add_select_cases(v, "the choice records beside its figures (a case's own AP does not change when its map is divided by one number, so they cannot move it)")
    _add_change_arguments(v, "the changed model")
    v.set_defaults(func=run_scan_relative)

    r = sub.add_parser("tune-restoration",
                       help="choose the restoration method's lambda on healthy scans and store it in the model")
    r.add_argument("model", help="VAE model name or folder")
    _add_tuning_arguments(r, limit=5)
    r.set_defaults(func=run_tune_restoration)

    s = sub.add_parser("tune-smoothing",
                       help="choose each method's 3D heatmap smoothing on synthetic anomalies in validation scans")
    s.add_argument("model", help="model name or folder")
    _add_tuning_arguments(s, limit=None)
    s.add_argument("--per-subject", type=int, default=2, help="synthetic cases per subject (default 2)")
    s.add_argument("--case-set", default="hard", choices=("hard", "balls"),
                   help="synthetic case set to tune on (default hard; see evaluate)")
    s.add_argument("--method", action="append",
                   help="tune only this method (repeatable); the others keep their widths. Default: every method")
    s.set_defaults(func=run_tune_smoothing)


def _add_tuning_arguments(parser: argparse.ArgumentParser, limit: int | None) -> None:
    """Arguments shared by the commands that tune a setting of a model on healthy scans and
    recalibrate it."""
    parser.add_argument("data", help="folder of healthy scans (with brain masks)")
    add_subjects(parser, "val", "which scans of DATA (default: the model's validation subjects)")
    parser.add_argument("--limit", type=int, default=limit,
                        help="use the first N of them" + (f" (default {limit})" if limit else ""))
    _add_change_arguments(parser, "the tuned (and recalibrated) model")


def _add_change_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    """Where a command that changes a model writes it (a new copy, or the model itself), and
    the device and quiet options every such command has."""
    parser.add_argument("--out", help=f"write {what} here")
    parser.add_argument("--in-place", action="store_true", help="change the model itself")
    add_device(parser)
    add_quiet(parser)


def run_calibrate(args: argparse.Namespace) -> int:
    from ..tooling.release.calibrate import calibrate_findings, calibrate_package
    from ..tooling.release.edit import changed_copy, subjects_of

    with changed_copy(args.model, args.out, args.in_place) as package:
        subjects = subjects_of(package, args.data, args.subjects)
        if args.findings_only:
            calibrate_findings(package, subjects, device=args.device, progress=say(args.quiet))
        else:
            calibrate_package(package, subjects, device=args.device, progress=say(args.quiet))
    print(f"calibrated {'the finding rule of ' if args.findings_only else ''}{package.path} on {len(subjects)} "
          "subjects")
    return EXIT_OK


def run_fpr(args: argparse.Namespace) -> int:
    from ..core.package import resolve_package
    from ..tooling.release.calibrate import findings_per_scan, flagged_fraction, score_subjects
    from ..tooling.release.edit import subjects_of

    package = resolve_package(args.model)
    if not package.calibration.pixel:
        raise InputError(f"model {package.name} is not calibrated; run anomaly-localizer calibrate first")
    subjects = subjects_of(package, args.data, args.subjects)
    results = list(score_subjects(package, subjects, device=args.device, progress=say(args.quiet)))
    table = flagged_fraction(results, package)
    found = findings_per_scan(results, package)
    print(f"Share of healthy brain voxels flagged by {package.name}'s calibrated thresholds "
          f"on {len(subjects)} '{args.subjects}' subjects of {args.data}:")
    print(f"{'method':<10} " + " ".join(f"{'target ' + k:>14}" for k in next(iter(table.values()))))
    for m, row in table.items():
        print(f"{m:<10} " + " ".join(f"{100 * v:13.3f}%" for v in row.values()))
    print("Findings on these healthy scans at the default threshold (regions: every connected region of at least "
          "0.05 mL; findings: those that pass the map's calibrated finding rule):")
    print(f"{'method':<10} {'regions/scan':>13} {'findings/scan':>14} {'scans with a finding':>21} {'largest':>9}")
    for m, row in found.items():
        print(f"{m:<10} {row['regions_per_scan']:13.2f} {row['findings_per_scan']:14.2f} "
              f"{100 * row['scans_with_finding']:20.0f}% {row['largest_finding_ml']:6.2f} mL"
              + ("" if row["rule"] else "  (no finding rule calibrated: every region counts)"))
    if args.json:
        Path(args.json).write_text(json.dumps({"model": package.name, "subjects": [s.id for s in subjects],
                                               "flagged_fraction": table, "findings": found,
                                               "command": command_line(), "machine": machine()}, indent=2) + "\n")
    return EXIT_OK


def run_standardise(args: argparse.Namespace) -> int:
    from ..core.package import resolve_package
    from ..tooling.release.edit import changed_copy, subjects_of
    from ..tooling.release.standardise import check_standardisable, standardise_package

    check_standardisable(resolve_package(args.model))  # refused before any copy, naming the user's model
    with changed_copy(args.model, args.out, args.in_place) as package:
        standardise_package(package, subjects_of(package, args.data, "train", choosable=False),
                            subjects_of(package, args.data, "calibration", choosable=False), args.device,
                            say(args.quiet))
    print(f"standardised {package.path}: its input histograms are mapped onto its training scans'; recalibrated")
    return EXIT_OK


def run_scan_relative(args: argparse.Namespace) -> int:
    from ..core.package import resolve_package
    from ..core.installed import check_methods
    from ..tooling.release.edit import changed_copy, store_and_recalibrate, subjects_of
    from ..tooling.release.scan_relative import choose_quantiles, scan_relative_block

    if args.quantile is not None and not 0.05 <= args.quantile <= 0.95:
        raise InputError(f"--quantile {args.quantile:g} is outside 0.05-0.95; the median (0.5) is the usual choice")
    if args.quantile is not None and args.absolute:
        raise InputError("give --quantile or --absolute, not both")
    source = resolve_package(args.model)  # refused before any copy is made, naming the user's model
    check_methods(args.method, source)
    real = select_cases_of(args)
    if source.detector is not None and source.detector.composite:
        components = [m for m in args.method if m not in source.detector.methods]
        if components:
            raise InputError(f"{', '.join(components)} of {source.name} is a component's map, which follows its own "
                             f"model; make that model's map scan-relative, or choose --method "
                             f"{' '.join(source.detector.methods)}")
    with changed_copy(args.model, args.out, args.in_place) as package:
        if args.absolute:
            quantiles, selection = {m: None for m in args.method}, {"rule": "made absolute by the user"}
        elif args.quantile is not None:
            quantiles = {m: args.quantile for m in args.method}
            selection = {"rule": f"quantile {args.quantile:g} given by the user"}
        else:
            found = choose_quantiles(package, subjects_of(package, args.data, "val", choosable=False), args.method,
                                     args.per_subject, args.device, progress=say(args.quiet), real_cases=real)
            quantiles, selection = found["chosen"], found["selection"]
        block = scan_relative_block(package, quantiles, selection)
        chosen = ", ".join(f"{m} " + (f"relative to its {100 * q:g}th percentile" if q else "absolute")
                           for m, q in quantiles.items())
        # only the maps whose reference changed are recalibrated; the others keep their thresholds
        changed = [m for m, q in quantiles.items() if q != source.scan_relative(m)]
        store_and_recalibrate(package, "scan_relative", block, args.data, args.device, say(args.quiet),
                              f"maps: {chosen}", methods=changed or list(quantiles))
    return EXIT_OK


def run_tune_restoration(args: argparse.Namespace) -> int:
    from ..tooling.release.edit import changed_copy, store_and_recalibrate, subjects_of
    from ..tooling.release.tune_restoration import tune_package

    with changed_copy(args.model, args.out, args.in_place) as package:
        if "restoration" not in package.methods:
            raise InputError(f"model {package.name} is not a VAE; restoration needs a vae or cevae model")
        block = tune_package(package, subjects_of(package, args.data, args.subjects), args.limit, args.device,
                             say(args.quiet))
        store_and_recalibrate(package, "restoration", block, args.data, args.device, say(args.quiet),
                              f"restoration lambda {block['lambda']:g}")
    return EXIT_OK


def run_tune_smoothing(args: argparse.Namespace) -> int:
    from ..core.package import resolve_package
    from ..core.installed import check_methods
    from ..tooling.release.edit import changed_copy, store_and_recalibrate, subjects_of
    from ..tooling.release.tune_smoothing import tune_package

    if args.method:  # refused before any copy is made, naming the model the user gave
        check_methods(args.method, resolve_package(args.model))
    with changed_copy(args.model, args.out, args.in_place) as package:
        subjects = subjects_of(package, args.data, args.subjects)
        if args.limit:
            subjects = subjects[: args.limit]
        block = tune_package(package, subjects, args.per_subject, args.device, say(args.quiet), methods=args.method,
                             cases=args.case_set)
        chosen = ", ".join(f"{m} {v['through_plane_mm']:g}/{v['in_plane_mm']:g} mm" for m, v in block.items()
                           if m != "selection" and (not args.method or m in args.method))
        store_and_recalibrate(package, "map_smoothing", block, args.data, args.device, say(args.quiet),
                              f"smoothing (through-plane/in-plane sigma) {chosen}")
    return EXIT_OK
