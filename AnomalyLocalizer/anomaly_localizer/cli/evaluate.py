"""``evaluate`` (accuracy on cases with ground truth), ``brainmask-dice``, ``benchmark``
(speed) and ``paper-fmnist`` (the paper's sample-wise experiment): commands that print
figures and record the command and machine that made them."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..core.contrast import CONTRASTS
from ..errors import InputError
from .common import (
    EXIT_OK,
    add_device,
    add_quiet,
    add_subjects,
    command_line,
    machine,
    say,
)


def register(sub) -> None:
    from ..tooling.evaluation.evaluate import CASE_SETS
    e = sub.add_parser("evaluate", help="pixel/slice AUROC, AP and Dice of every method on cases with ground truth")
    e.add_argument("model", help="model name or folder")
    e.add_argument("--synthetic", metavar="DATA", help="healthy scans to insert seeded synthetic anomalies into")
    e.add_argument("--cases", metavar="DIR", help="real cases: one sub-folder per case with image and label")
    e.add_argument("--image-name", action="append", metavar="NAME",
                   help="image file in each case folder (default image.nii.gz); repeat it with --contrast for cases "
                        "of several co-registered contrasts (the first one's grid is the reference)")
    e.add_argument("--contrast", action="append", metavar="C", choices=CONTRASTS,
                   help="the contrast of the cases' images (one per --image-name), or of the --synthetic scans "
                        "(renderings of other contrasts are then taken); the models must read them. Default: the "
                        "first model's contrasts")
    e.add_argument("--label-name", default="label.nii.gz", help="ground-truth file in each case folder (> 0 = anomaly)")
    e.add_argument("--mask-name", help="brain mask file in each case folder (optional)")
    e.add_argument("--title", help="title of this case set in reports")
    add_subjects(e, "test", "which of DATA's subjects (default: the model's held-back test subjects)")
    e.add_argument("--case-set", default="hard", choices=CASE_SETS,
                   help="synthetic case set: hard (default: 1-3 ellipsoids of 6-20 mm per case, subtle to strong, "
                        "soft or hard edges) or balls (one hard-edged ball per case, the set of version 0.1)")
    e.add_argument("--per-subject", type=int, default=2, help="synthetic cases per subject")
    e.add_argument("--limit", type=int, help="use only the first N subjects")
    e.add_argument("--seed", type=int, default=0)
    add_device(e)
    e.add_argument("--also", action="append", metavar="MODEL",
                   help="another model whose methods join the table (repeatable), e.g. brain-t1-lsr")
    e.add_argument("--method", action="append", metavar="M", help="evaluate only these methods (repeatable)")
    e.add_argument("--restoration", choices=["package", "reference"], default="package",
                   help="restoration optimiser: the package's fast one, or the reference 500 gradient steps")
    e.add_argument("--bf16", action="store_true",
                   help="score the dae and ssl networks under bf16 autocast (to compare with float32, the default)")
    e.add_argument("--json", help="also write the results as JSON")
    add_quiet(e)
    e.set_defaults(func=run_evaluate)

    d = sub.add_parser("brainmask-dice", help="Dice of the brain extraction against reference masks")
    d.add_argument("model", help="brain extraction model name or folder")
    d.add_argument("data", help="folder of scans with reference brain masks (or of case folders, with --cases)")
    add_subjects(d, "test", "which of DATA's subjects (default: the model's held-back test subjects)")
    d.add_argument("--cases", action="store_true", help="DATA holds one sub-folder per case (e.g. BraTS)")
    d.add_argument("--engine-rule", action="store_true",
                   help="measure the mask the engine uses given the image alone (skull-stripped scans keep their "
                        "non-background region; whole heads are brain-extracted)")
    d.add_argument("--with-lesion", action="store_true",
                   help="first insert one seeded tumour-like lesion (15-30 mm, brighter, darker or uniform) into "
                        "each scan's brain, and also report how much of it the extracted mask keeps")
    d.add_argument("--lesion-seed", type=int, default=0, help="with --with-lesion: seed of the lesions")
    d.add_argument("--image-name", default="image.nii.gz", help="with --cases: the image in each case folder")
    d.add_argument("--mask-name", default="brainmask.nii.gz", help="with --cases: the reference brain mask")
    add_device(d, "cpu")
    d.add_argument("--json")
    add_quiet(d)
    d.set_defaults(func=run_brainmask_dice)

    u = sub.add_parser("unfamiliar-scans", help="write healthy T1 scans from other sources (Colin27, MNI152) as "
                                                 "folders for fpr: how much of such a brain each map flags")
    u.add_argument("out", help="folder to write colin27/ and mni152/ into")
    u.add_argument("--colin27", default=None, help="a skull-stripped Colin27 T1 (default: mricron-data's ch2bet)")
    u.set_defaults(func=run_unfamiliar_scans)

    b = sub.add_parser("benchmark", help="time scoring on a real 2 mm and a 1 mm volume (prints figures)")
    b.add_argument("--data", default="../shared/data/ixi_t1_2mm", help="IXI-style folder (t1/, brainmask/)")
    b.add_argument("--model", help="model name or folder (default: the default model)")
    b.add_argument("--repeats", type=int, default=3)
    add_device(b, "cpu")
    b.add_argument("--no-reference", action="store_true", help="skip the reference-way comparison")
    b.add_argument("--method", action="append", metavar="M",
                   help="time these methods (repeatable; default the five VAE scores). Run restoration and lsr "
                        "in their own invocations: peak memory is per process")
    b.add_argument("--restoration", choices=["package", "reference"], default="package",
                   help="restoration optimiser to time: the package's fast one or the reference 500 steps")
    b.add_argument("--bf16", action="store_true",
                   help="also time the dae and ssl networks under bf16 autocast, beside float32")
    b.add_argument("--worst-case", action="store_true",
                   help="instead: every method of every installed model on a 1 mm lesioned scan, a BraTS case and "
                        "the MNI152 template (--data: the shared data folder holding ixi_t1_2mm and "
                        "brats2015_t1c_flair), each in its own process for its peak memory, and `score` end to end "
                        "on a 1 mm whole-head scan")
    b.add_argument("--contrasts", metavar="RENDERS",
                   help="instead: `score` end to end on a 1 mm study of one contrast and of two (T1, FLAIR, T1 + "
                        "FLAIR) made from --data's first subject and its renderings in RENDERS (`render`), each with "
                        "the model the engine chooses for it")
    b.add_argument("--json", help="also write the figures to this JSON file")
    b.set_defaults(func=run_benchmark)

    bs = sub.add_parser("benchmark-screen", help="scans per minute of screening, serial and on a local Dask cluster, "
                                                 "and whether both worklists agree (prints figures)")
    bs.add_argument("inputs", nargs="+", metavar="INPUT", help="as for screen: files, folders or a CSV list")
    bs.add_argument("--model", help="model name or folder (default: the default model)")
    bs.add_argument("--workers", type=int, help="workers of the local cluster (default: one per core)")
    add_device(bs)
    bs.add_argument("--json", help="also write the figures to this JSON file")
    add_quiet(bs)
    bs.set_defaults(func=run_benchmark_screen)

    cw = sub.add_parser("compare-worklists", help="whether two screening worklists of the same scans agree "
                                                  "(ranking, statuses, top slices, scan scores); exit 0 when "
                                                  "they do, 4 when they differ")
    cw.add_argument("first", help="a worklist folder")
    cw.add_argument("second", help="another worklist folder")
    cw.set_defaults(func=run_compare_worklists)

    from ..tooling.evaluation.paper import DEFAULT_DATA
    p = sub.add_parser("paper-fmnist", help="the paper's sample-wise FashionMNIST experiment (prints a table)")
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json")
    add_quiet(p)
    p.set_defaults(func=run_paper)


def run_evaluate(args: argparse.Namespace) -> int:
    from ..core.package import resolve_package
    from ..core.installed import check_methods
    from ..core.restoration import REFERENCE_RESTORATION
    from ..tooling.release.edit import subjects_of
    from ..tooling.evaluation.evaluate import case_set, evaluate, folder_cases, format_table
    from ..core.contrast import parse_contrast
    from ..core.study import reads
    from ..tooling.rendering import rendered_contrast

    package = resolve_package(args.model)
    runs = [(package, [m for m in (args.method or package.methods) if m in package.methods])]
    for extra in args.also or []:
        other = resolve_package(extra)
        runs.append((other, [m for m in (args.method or other.methods) if m in other.methods]))
    if args.method:
        check_methods(args.method)
        offered = {m for _, ms in runs for m in ms}
        missing = [m for m in args.method if m not in offered]
        if missing:
            raise InputError(f"no given model offers {', '.join(missing)}; add one that does with --also MODEL")
    if args.restoration == "reference":
        for p, _ in runs:
            if "restoration" in p.methods:
                p.meta["restoration"] = {**p.settings("restoration"), **REFERENCE_RESTORATION}
    runs = [(p, ms) for p, ms in runs if ms]
    contrasts = [parse_contrast(c) for c in args.contrast] if args.contrast else list(package.contract.contrasts)
    for p, _ in runs:  # no map is made of a contrast its model was not made for
        ok, _ = reads(p, contrasts)
        if not ok:
            raise InputError(f"model {p.name} reads {', '.join(p.contract.contrasts)}, not "
                             f"{' + '.join(contrasts)}; evaluate it on its own contrasts, or give --contrast")
    if bool(args.synthetic) == bool(args.cases):
        raise InputError("give either --synthetic DATA (healthy scans) or --cases DIR (cases with ground truth)")
    if args.synthetic:
        # the anomalies go into the scans (or renderings) of the first contrast; a rendering's
        # study adds the T1 it was rendered from, unchanged
        subjects = [s for s in subjects_of(package, args.synthetic, args.subjects, contrasts=contrasts)
                    if rendered_contrast(s.id) in (None, contrasts[0])
                    and all(c in (contrasts[0], *dict(s.others)) for c in contrasts)]
        if not subjects:
            raise InputError(f"none of the model's {args.subjects} subjects in {args.synthetic} is a "
                             f"{contrasts[0]} scan or rendering")
        if args.limit:
            subjects = subjects[: args.limit]
        cases = case_set(args.case_set, subjects, per_subject=args.per_subject, seed=args.seed)
        record = {"kind": "synthetic", "set": args.case_set, "data": str(args.synthetic), "subjects": args.subjects,
                  "per_subject": args.per_subject, "seed": args.seed, "contrasts": contrasts}
        title = f"synthetic anomalies ({args.case_set} set) in the model's '{args.subjects}' subjects"
    else:
        names = args.image_name or ["image.nii.gz"]
        cases = folder_cases(args.cases, names, args.label_name, args.mask_name,
                             contrasts if args.contrast else None)
        record = {"kind": "folder", "data": str(args.cases), "image": names[0] if len(names) == 1 else names,
                  "label": args.label_name, "contrasts": contrasts}
        title = args.title or f"cases in {args.cases} ({' + '.join(names)})"
    result = evaluate(runs, cases, device=args.device, progress=say(args.quiet), bf16=args.bf16)
    result.update(restoration_optimiser=args.restoration, case_set=record, title=title, command=command_line(),
                  machine=machine())
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return EXIT_OK


def run_brainmask_dice(args: argparse.Namespace) -> int:
    import numpy as np

    from ..core.package import resolve_package
    from ..tooling.training.brainmask import LESION_KINDS, LESION_RADIUS_MM, dice_on_subjects
    from ..tooling.data import Subject
    from ..tooling.release.edit import subjects_of

    package = resolve_package(args.model)
    if args.cases:
        # Case folders (e.g. BraTS): one image and one reference brain mask per sub-folder.
        root = Path(args.data)
        subjects = [Subject(f.name, f / args.image_name, f / args.mask_name) for f in sorted(root.iterdir())
                    if (f / args.image_name).is_file() and (f / args.mask_name).is_file()]
        if not subjects:
            raise InputError(f"no sub-folder of {root} holds both {args.image_name} and {args.mask_name}")
        which = f"case folders ({args.image_name})"
    else:
        subjects = [s for s in subjects_of(package, args.data, args.subjects) if s.mask is not None]
        which = f"'{args.subjects}' subjects"
    if args.engine_rule:
        which += ", the engine's own choice of brain mask"
    if args.with_lesion:
        if args.cases:
            raise InputError("--with-lesion needs healthy scans with reference masks, not --cases")
        which = f"{which} (each with a seeded tumour-like lesion)"
    records = dice_on_subjects(package, subjects, device=args.device, progress=say(args.quiet),
                               engine_rule=args.engine_rule, lesion_seed=args.lesion_seed if args.with_lesion else None)
    values = np.array([r["dice"] for r in records.values()])
    print(f"brain extraction {package.name} on {len(values)} {which}, {args.data}: "
          f"Dice mean {values.mean():.4f}, median {np.median(values):.4f}, min {values.min():.4f}")
    result = {"model": package.name, "dice": {k: r["dice"] for k, r in records.items()},
              "mean": float(values.mean()), "min": float(values.min())}
    if args.with_lesion:
        kept = np.array([r["lesion_kept"] for r in records.values() if r["lesion_kept"] is not None])
        print(f"share of each lesion's voxels inside the extracted mask: mean {100 * kept.mean():.2f} %, "
              f"min {100 * kept.min():.2f} %")
        result["lesions"] = {"seed": args.lesion_seed, "radius_mm": list(LESION_RADIUS_MM),
                             "kinds": list(LESION_KINDS),
                             "per_subject": {k: {f: r[f] for f in ("kind", "lesion_voxels", "lesion_kept")}
                                             for k, r in records.items()},
                             "lesion_kept_mean": float(kept.mean()), "lesion_kept_min": float(kept.min())}
    if args.json:
        Path(args.json).write_text(json.dumps({**result, "command": command_line(), "machine": machine()},
                                              indent=2) + "\n")
    return EXIT_OK


def run_benchmark(args: argparse.Namespace) -> int:
    from ..tooling.evaluation.benchmark import run_benchmark as bench

    if args.contrasts:
        from ..tooling.evaluation.benchmark_contrasts import format_contrast_benchmark, run_contrast_benchmark
        result = run_contrast_benchmark(args.data, args.contrasts, args.repeats, args.device, say(False))
        print(format_contrast_benchmark(result))
        if args.json:
            Path(args.json).write_text(json.dumps({**result, "command": command_line(), "machine": machine()},
                                                  indent=2) + "\n")
        return EXIT_OK
    if args.worst_case:
        from ..tooling.evaluation.benchmark_worst import run_worst_case
        data = Path(args.data)
        result = run_worst_case(data.parent if data.name == "ixi_t1_2mm" else data, None)
        if args.json:
            Path(args.json).write_text(json.dumps({**result, "command": command_line(), "machine": machine()},
                                                  indent=2) + "\n")
        return EXIT_OK

    bench(args.data, args.model, args.method, args.repeats, args.device, args.no_reference, args.restoration, args.json,
          bf16=args.bf16)
    return EXIT_OK


def run_benchmark_screen(args: argparse.Namespace) -> int:
    from ..core.package import resolve_package
    from ..tooling.screening.benchmark_screen import benchmark_screening
    from ..tooling.screening.screen import ScreenOptions

    package = resolve_package(args.model)
    options = ScreenOptions(str(package.path.resolve()), package.name, package.manifest_sha256,
                            tuple(package.default_methods()), device=args.device)
    result = benchmark_screening(args.inputs, options, args.workers, say(args.quiet))
    c = result["comparison"]
    print(f"screening agrees with serial scoring: {'yes' if c['agree'] else 'NO'} (same ranking, statuses and top "
          f"slices: {c['same_ranking_status_and_top_slices']}; largest relative difference of a scan score "
          f"{c['max_relative_volume_score_difference']:.1e})")
    for label, r in result["runs"].items():
        print(f"{label}: {r['scans_per_minute']:.1f} scans/min ({r['scans']} scans, {r['failed']} failed, "
              f"{r['seconds']:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps({**result, "inputs": args.inputs, "command": command_line(),
                                               "machine": machine()}, indent=2) + "\n")
    return EXIT_OK


EXIT_WORKLISTS_DIFFER = 4  # like diff(1): a result, not an error


def run_compare_worklists(args: argparse.Namespace) -> int:
    from ..core.worklist import read_worklist
    from ..tooling.screening.benchmark_screen import compare_worklists

    try:
        a, b = read_worklist(args.first), read_worklist(args.second)
    except (OSError, ValueError) as exc:
        raise InputError(str(exc)) from None
    shared = {r.id for r in a.rows} & {r.id for r in b.rows}
    if not shared:
        raise InputError(f"{args.first} and {args.second} share no scans ({len(a.rows)} and {len(b.rows)} scans, no id "
                         "in common); compare two worklists of the same scans")
    c = compare_worklists(a.rows, b.rows)
    print(f"{'agree' if c['agree'] else 'DIFFER'}: same ranking, statuses and top slices "
          f"{c['same_ranking_status_and_top_slices']}; largest relative difference of a scan score "
          f"{c['max_relative_volume_score_difference']:.1e} ({len(a.rows)} and {len(b.rows)} scans)")
    return EXIT_OK if c["agree"] else EXIT_WORKLISTS_DIFFER


def run_paper(args: argparse.Namespace) -> int:
    from ..tooling.evaluation.paper import SETTINGS, load_fashion_mnist, run_setting

    data = load_fashion_mnist(args.data)
    results = [run_setting(data, s["held_out"], s["log_c"], args.epochs, args.seed, say(args.quiet))
               for s in SETTINGS]
    print("Sample-wise anomaly detection on FashionMNIST (AUROC; held-out class = anomaly)")
    print(f"{'held out':>8} {'log c':>6} {'Rec':>7} {'KL':>7} {'ELBO':>7}   paper")
    for r in results:
        a = r["auroc"]
        paper = ", ".join(f"{k.upper()} {v:.2f}" for k, v in r["paper"].items()) or "see the paper's Fig. 1"
        print(f"{r['held_out']:>8} {r['log_c']:>6g} {a['rec']:>7.3f} {a['kl']:>7.3f} {a['elbo']:>7.3f}   {paper}")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "data": args.data}, indent=2) + "\n")
    return EXIT_OK


def run_unfamiliar_scans(args: argparse.Namespace) -> int:
    from ..tooling.evaluation.unfamiliar import COLIN27, write_unfamiliar_scans
    folders = write_unfamiliar_scans(Path(args.out), Path(args.colin27) if args.colin27 else COLIN27)
    for folder in folders:
        print(f"wrote {folder}: anomaly-localizer fpr MODEL {folder} --subjects all")
    return EXIT_OK
