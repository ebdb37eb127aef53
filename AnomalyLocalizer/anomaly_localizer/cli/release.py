"""``release`` (a shippable package), ``fuse`` (a fused default map), ``card`` (its model card)
and ``index`` (pin a folder)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..core.contrast import CONTRASTS
from ..errors import InputError
from .common import EXIT_OK, add_device, add_quiet, add_select_cases, say, select_cases_of


def register(sub) -> None:
    k = sub.add_parser("card", help="write a model package's model card from its model.json and measured figures")
    k.add_argument("model", help="model package folder")
    k.add_argument("--evaluation", action="append", help="JSON written by `evaluate --json` (repeatable)")
    k.add_argument("--fpr", help="JSON written by `fpr --json`")
    k.add_argument("--dice", action="append",
                   help="JSON written by `brainmask-dice --json` (brain extraction models; repeatable)")
    k.set_defaults(func=run_card)

    r = sub.add_parser("release", help="make a shippable copy of a trained model (name, float16, metadata, calibration)")
    r.add_argument("model", help="trained model package folder")
    r.add_argument("--out", required=True, help="new package folder; its name becomes the model name")
    r.add_argument("--data", required=True, help="the healthy data the model was trained on (for recalibration)")
    r.add_argument("--meta", help="JSON merged into model.json (summary, description, data statement, ...)")
    r.add_argument("--half", action="store_true", help="store weights as float16 (half the size)")
    r.add_argument("--contrast", choices=CONTRASTS, action="append",
                   help="the contrast the released model reads (one release per contrast of a network trained on "
                        "renderings of several), calibrated on --data's renderings of it; repeated, for an anatomy "
                        "model: the first is scored, the others are the study's contrasts it also reads (e.g. "
                        "--contrast flair --contrast t1: the tissue classes from the study's T1)")
    add_device(r, "cpu")
    r.add_argument("--force", action="store_true")
    add_quiet(r)
    r.set_defaults(func=run_release)

    j = sub.add_parser("join-folds", help="one self-supervised detector that averages folds trained on different "
                                          "task families (then release it)")
    j.add_argument("folds", nargs="+", help="trained fold packages (train-ssl --tasks ... --held-out ...)")
    j.add_argument("--out", required=True, help="new package folder")
    j.add_argument("--force", action="store_true")
    j.set_defaults(func=run_join_folds)

    f = sub.add_parser("fuse", help="make a fused model: several calibrated maps combined in healthy anomaly levels")
    f.add_argument("components", nargs="*", metavar="MODEL:METHOD",
                   help="candidate component maps, e.g. brain-t1-dae:dae brain-t1-ssl:ssl brain-t1-vae:elbo_grad")
    f.add_argument("--like", metavar="FUSED", help="rebuild this fused model on its components as installed now "
                   "(same rule, weights, slice score, texts) and recalibrate: after a component changed")
    f.add_argument("--out", required=True, help="new package folder; its name becomes the model name")
    f.add_argument("--data", help="the components' healthy data: to choose the rule (validation subjects) and "
                   "calibrate (calibration subjects)")
    f.add_argument("--rule", default="auto", choices=("auto", "mean", "max", "weighted"),
                   help="auto: choose the components and rule (mean, max or weighted mean) with the best pixel AP on "
                        "validation cases (default); weighted: the weighted mean with --weights")
    f.add_argument("--weights", type=lambda v: [float(x) for x in v.split(",")], metavar="W1,W2",
                   help="with --rule weighted: one weight per component, in order (e.g. those chosen for another map)")
    f.add_argument("--per-subject", type=int, default=2, help="synthetic validation cases per subject (auto)")
    add_select_cases(f, "the choice (auto) also weighs")
    f.add_argument("--meta", help="JSON merged into model.json (summary, description, data statement, ...)")
    add_device(f, "cpu")
    f.add_argument("--force", action="store_true")
    add_quiet(f)
    f.set_defaults(func=run_fuse)

    u = sub.add_parser("make-rule", help="make a model of the intensity rule (brighter than the brain's median, "
                                         "smoothed) for one contrast, calibrated on healthy scans or renderings")
    u.add_argument("data", help="healthy scans or renderings of the contrast (e.g. a folder made by `render`)")
    u.add_argument("--contrast", required=True, choices=CONTRASTS)
    u.add_argument("--out", required=True, help="new package folder; its name becomes the model name")
    u.add_argument("--direction", default="bright", choices=("bright", "dark", "both"))
    u.add_argument("--smoothing", type=float, default=1.0, help="Gaussian sigma in model pixels (2 mm)")
    u.add_argument("--meta", help="JSON merged into model.json (summary, data statement, limitations)")
    u.add_argument("--force", action="store_true")
    add_quiet(u)
    u.set_defaults(func=run_make_rule)

    i = sub.add_parser("index", help="pin the models of a folder in its index.json (after adding or changing one)")
    i.add_argument("folder", help="a models folder, e.g. models/")
    i.add_argument("--default", help="the default anomaly model")
    i.add_argument("--brain-extraction", help="the default brain extraction model")
    i.add_argument("--prefer", action="append", metavar="MODEL",
                   help="models in order of preference when several read a study's contrasts (repeatable; "
                        "replaces the folder's list)")
    i.set_defaults(func=run_index)


def run_card(args: argparse.Namespace) -> int:
    from ..core.package import (
        BRAIN_EXTRACTION_TYPES,
        CARD_FILE,
        load_package,
        write_manifest,
    )
    from ..tooling.release.modelcard import render_brainmask_card, results_sections, write_card

    package = load_package(args.model)
    if package.arch_type in BRAIN_EXTRACTION_TYPES:
        dice = [json.loads(Path(p).read_text()) for p in args.dice or []]
        (package.path / CARD_FILE).write_text(render_brainmask_card(package, dice))
        write_manifest(package.path)
        print(f"wrote {package.path / CARD_FILE}")
        return EXIT_OK
    evaluations = [json.loads(Path(p).read_text()) for p in args.evaluation or []]
    fpr = json.loads(Path(args.fpr).read_text()) if args.fpr else None
    path = write_card(package, results_sections(evaluations, fpr, package))
    print(f"wrote {path} and re-hashed {package.path / 'manifest.json'}")
    return EXIT_OK


def run_release(args: argparse.Namespace) -> int:
    from ..tooling.release.edit import release_package

    package, n = release_package(args.model, args.out, args.data, args.meta, args.half, args.force, args.device,
                                 say(args.quiet), contrast=args.contrast)
    calibrated = f", calibrated on {n} subjects" if n else ""
    print(f"released {package.path} from {args.model} ({'float16' if args.half else 'float32'} weights){calibrated}")
    return EXIT_OK


def run_join_folds(args: argparse.Namespace) -> int:
    from ..tooling.release.folds import join_folds

    package = join_folds(args.folds, args.out, args.force)
    print(f"wrote {package.path}: {package.architecture['folds']} folds (uncalibrated: release it to calibrate)")
    return EXIT_OK


def run_fuse(args: argparse.Namespace) -> int:
    from ..tooling.release.fusion import make_fused

    if args.like:
        from ..tooling.release.fusion import rebuild_fused
        if args.components or args.rule != "auto" or args.weights or args.meta or args.select_cases \
                or args.select_ids or args.per_subject != 2:
            raise InputError("--like takes the components, rule, weights and texts from the fused model it names and "
                             "chooses nothing; give no components, --rule, --weights, --meta, --select-cases or "
                             "--per-subject with it")
        package = rebuild_fused(args.like, args.out, args.data, args.device, args.force, say(args.quiet))
        print(f"wrote {package.path}: {package.architecture['rule']} of "
              f"{', '.join(c['method'] for c in package.architecture['components'])}, like {args.like}, recalibrated")
        return EXIT_OK
    if not args.components:
        raise InputError("give the component maps (MODEL:METHOD ...), or --like FUSED to rebuild a fused model")
    chosen = select_cases_of(args)
    package = make_fused(args.components, args.out, args.data, args.rule, args.per_subject, args.device, args.force,
                         say(args.quiet), meta_file=args.meta, select_cases=chosen, weights=args.weights)
    arch = package.architecture
    print(f"wrote {package.path}: {arch['rule']} of {', '.join(c['method'] for c in arch['components'])}"
          f"{'' if package.calibration.pixel else ' (uncalibrated: pass --data to calibrate)'}")
    return EXIT_OK


def run_index(args: argparse.Namespace) -> int:
    """Write DIR/index.json: the default models and each package's pinned manifest hash."""
    from ..tooling.release.edit import write_index

    index = write_index(args.folder, args.default, args.brain_extraction, args.prefer)
    print(f"wrote {Path(args.folder) / 'index.json'} ({len(index['models'])} models)")
    return EXIT_OK


def run_make_rule(args: argparse.Namespace) -> int:
    from ..tooling.release.rule import make_rule_package
    package = make_rule_package(args.out, args.contrast, args.data, direction=args.direction,
                                smoothing_px=args.smoothing, force=args.force, progress=say(args.quiet),
                                meta_file=args.meta)
    print(f"wrote {package.path}")
    return EXIT_OK
