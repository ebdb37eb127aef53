"""The ``anomaly-localizer`` command.

Exit codes: 0 success; 2 bad input, model or options (one line on stderr saying what was
wrong and what to do; no output written); 3 cancelled; 1 an unexpected error (a bug: the
traceback is printed). Progress goes to stderr as lines ``PROGRESS <percent> <message>``,
which the Slicer module reads from its child process.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from pathlib import Path

from . import __version__
from .errors import AnomalyLocalizerError, CancelledError, InputError

EXIT_OK, EXIT_BUG, EXIT_INPUT, EXIT_CANCELLED = 0, 1, 2, 3


def _progress_printer(quiet: bool):
    def report(fraction: float, message: str) -> None:
        if not quiet:
            print(f"PROGRESS {100 * fraction:5.1f} {message}", file=sys.stderr, flush=True)
    return report


def _command_line() -> str:
    import shlex
    return "anomaly-localizer " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _machine() -> str:
    import os
    import platform
    import torch
    try:
        usable = len(os.sched_getaffinity(0))  # what this process may use (e.g. under taskset)
    except AttributeError:
        usable = os.cpu_count()
    cores = f"{os.cpu_count()} cores" if usable == os.cpu_count() else f"{usable} of {os.cpu_count()} cores"
    return f"{platform.machine()}, {cores}, torch {torch.__version__}"


def default_methods(package) -> list[str]:
    """The model's methods, its recommended one first (it makes the segmentation).
    ``restoration`` (an optimisation per slice, seconds rather than milliseconds) only when
    asked for or recommended."""
    first = package.meta.get("recommended_method")
    offered = [m for m in package.methods if m != "restoration" or first == "restoration"]
    return ([first] if first in offered else []) + [m for m in offered if m != first]


def cmd_score(args: argparse.Namespace) -> int:
    from .imageio import as_3d, read_image
    from .outputs import check_output_dir, write_results
    from .package import resolve_package_for
    from .pipeline import check_methods, score_volume

    t0 = time.perf_counter()
    out = Path(args.out)
    # Everything that can be refused is checked before any work and before any write.
    check_output_dir(out, args.force)
    package = resolve_package_for(args.method, args.model)
    methods = check_methods(args.method or default_methods(package), package)
    if args.threshold is not None:
        threshold, meaning, source = float(args.threshold), "given with --threshold", "user"
    else:
        calibrated = package.default_threshold(methods[0])
        if calibrated is None:
            raise InputError(f"model {package.name} has no calibrated threshold for {methods[0]}; "
                             "pass --threshold or calibrate the model (anomaly-localizer calibrate)")
        threshold, meaning = calibrated
        source = "calibrated"
    image = as_3d(read_image(args.input, "INPUT"))
    mask = as_3d(read_image(args.mask, "MASK")) if args.mask else None
    t_read = time.perf_counter() - t0

    result = score_volume(image, package, methods, mask=mask, device=args.device,
                          progress=_progress_printer(args.quiet), brain_extraction=args.brain_extraction)
    summary = {
        "engine_version": __version__,
        "input": str(Path(args.input).resolve()),
        "mask": str(Path(args.mask).resolve()) if args.mask else None,
        "brain_mask_source": result.info["brain_mask_source"],
        "model": {"name": package.name, "path": str(package.path.resolve()), "manifest_sha256": package.manifest_sha256},
        "methods": methods,
        "threshold": {"method": methods[0], "value": threshold, "source": source, "meaning": meaning},
        "volume_score": {"value": result.volume_score, "meaning": result.info["volume_score_meaning"]},
        "primary_slice_score": result.info["primary_slice_score"],
        "map_smoothing_mm": result.info["map_smoothing"],
        "axial_axis": result.axial_axis,
        "scored_slices": result.info["scored_slices"],
        "brain_fraction_in_field_of_view": result.info["fov_coverage"],
        "device": result.device,
        "timings_s": {"read": t_read, **result.timings},
    }
    t_write = time.perf_counter()
    from .calibrate import healthy_fpr
    written = write_results(out, image, result, threshold, summary, force=args.force,
                            healthy_rate=healthy_fpr(package.calibration, methods[0], threshold))
    note = written.get("note")
    if note:
        print(f"note: {note}", file=sys.stderr)  # shown even with -q: it changes how to read the result
    if not args.quiet:
        print(f"PROGRESS 100.0 wrote {out} in {time.perf_counter() - t0:.1f} s "
              f"(writing {time.perf_counter() - t_write:.1f} s)", file=sys.stderr)
    return EXIT_OK


def cmd_models(args: argparse.Namespace) -> int:
    from .package import default_model_name, list_packages, load_package

    default = default_model_name()
    rows = []
    for path in list_packages():
        try:
            p = load_package(path)
            rows.append({"name": p.name, "path": str(path), "default": p.name == default, "ok": True,
                         "summary": p.meta.get("summary", ""), "methods": list(p.methods)})
        except AnomalyLocalizerError as exc:
            rows.append({"name": path.name, "path": str(path), "default": False, "ok": False, "error": str(exc)})
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            flag = "*" if r["default"] else " "
            state = (r.get("summary", "") + (f" (methods: {', '.join(r['methods'])})" if r["methods"] else "")) \
                if r["ok"] else f"BROKEN: {r['error']}"
            print(f"{flag} {r['name']:<24} {state}  [{r['path']}]")
        if not rows:
            print("no models installed (see README, 'Models')")
    return EXIT_OK


def cmd_train(args: argparse.Namespace) -> int:
    from .train import TrainConfig, train

    cfg = TrainConfig.from_json(args.config, type=args.type, slice_size=args.slice_size, latent_size=args.latent_size,
                                likelihood_std=args.c, max_epochs=args.epochs, seed=args.seed,
                                batch_size=args.batch_size, spacing_mm=args.spacing)
    train(args.data, args.out, cfg, resume=args.resume, force=args.force, device=args.device,
          cache_dir=args.cache, progress=not args.quiet, calibrate=not args.no_calibration)
    return EXIT_OK


def _subjects_of(package, data: str, which: str):
    from .data import find_subjects
    subjects = find_subjects(data)
    if which == "all":
        return subjects
    recorded = set(package.meta.get("provenance", {}).get("subjects", {}).get(which, []))
    chosen = [s for s in subjects if s.id in recorded]
    if not chosen:
        raise InputError(f"none of the model's {which} subjects are in {data}; pass --subjects all to use every "
                         "scan there (they must be healthy and not used for training)")
    return chosen


@contextlib.contextmanager
def changed_copy(model: str, out: str | None, in_place: bool):
    """:func:`prepare_copy` for a block that changes the package: a new copy that the block
    fails to finish is removed, so a failed command leaves no half-made model behind."""
    import shutil
    package = prepare_copy(model, out, in_place)
    try:
        yield package
    except BaseException:
        if out:
            shutil.rmtree(out, ignore_errors=True)
        raise


def prepare_copy(model: str, out: str | None, in_place: bool):
    """The package a changing command (calibrate, tune-restoration) works on: a new copy in
    ``out``, or with ``in_place`` the model itself, unless an index.json pins it."""
    import shutil
    from .package import load_package, resolve_package

    package = resolve_package(model)
    if out:
        dest = Path(out)
        if dest.exists():
            raise InputError(f"{dest} already exists; choose a new folder for the changed model")
        shutil.copytree(package.path, dest, ignore=shutil.ignore_patterns("checkpoint", ".cache"))
        meta = json.loads((dest / "model.json").read_text())
        meta["name"] = dest.name
        from .package import update_meta
        update_meta(dest, meta)
        return load_package(dest)
    if not in_place:
        raise InputError("give --out NEW_MODEL_DIR for a changed copy, or --in-place to change "
                         f"{package.path} itself")
    index = package.path.parent / "index.json"
    if index.is_file() and package.path.name in json.loads(index.read_text()).get("models", {}):
        raise InputError(f"{package.path} is pinned in {index}; change a copy with --out NEW_MODEL_DIR "
                         "(or run `anomaly-localizer index` after changing it)")
    return package


def add_tuning_arguments(parser: argparse.ArgumentParser, limit: int | None) -> None:
    """Arguments shared by the commands that tune a setting of a model on healthy scans and
    recalibrate it (tune-restoration, tune-smoothing)."""
    parser.add_argument("data", help="folder of healthy scans (with brain masks)")
    parser.add_argument("--subjects", default="val", choices=["all", "calibration", "test", "val"],
                        help="which scans of DATA (default: the model's validation subjects)")
    parser.add_argument("--limit", type=int, default=limit,
                        help="use the first N of them" + (f" (default {limit})" if limit else ""))
    parser.add_argument("--out", help="write the tuned (and recalibrated) model here")
    parser.add_argument("--in-place", action="store_true", help="change the model itself")
    parser.add_argument("--device", default="auto")
    parser.add_argument("-q", "--quiet", action="store_true")


def store_and_recalibrate(package, key: str, block: dict, data: str, device: str, say, message: str):
    """Store ``block`` under ``key`` in the package's model.json, then recalibrate its
    thresholds on the model's calibration subjects of ``data`` (the maps have changed)."""
    from .calibrate import calibrate_package
    from .package import load_package, update_meta
    meta = dict(package.meta)
    meta[key] = block
    update_meta(package.path, meta)
    package = load_package(package.path)
    print(f"{message} for {package.name}; recalibrating its thresholds")
    return calibrate_package(package, _subjects_of(package, data, "calibration"), device=device, progress=say)


def cmd_calibrate(args: argparse.Namespace) -> int:
    from .calibrate import calibrate_package

    with changed_copy(args.model, args.out, args.in_place) as package:
        subjects = _subjects_of(package, args.data, args.subjects)
        calibrate_package(package, subjects, device=args.device,
                          progress=None if args.quiet else (lambda m: print(m, file=sys.stderr)))
    print(f"calibrated {package.path} on {len(subjects)} subjects")
    return EXIT_OK


def cmd_fpr(args: argparse.Namespace) -> int:
    from .calibrate import flagged_fraction, score_subjects
    from .package import resolve_package

    package = resolve_package(args.model)
    if not package.calibration.get("pixel"):
        raise InputError(f"model {package.name} is not calibrated; run anomaly-localizer calibrate first")
    subjects = _subjects_of(package, args.data, args.subjects)
    results = list(score_subjects(package, subjects, device=args.device,
                                  progress=None if args.quiet else (lambda m: print(m, file=sys.stderr))))
    table = flagged_fraction(results, package)
    print(f"Share of healthy brain voxels flagged by {package.name}'s calibrated thresholds "
          f"on {len(subjects)} '{args.subjects}' subjects of {args.data}:")
    print(f"{'method':<10} " + " ".join(f"{'target ' + k:>14}" for k in next(iter(table.values()))))
    for m, row in table.items():
        print(f"{m:<10} " + " ".join(f"{100 * v:13.3f}%" for v in row.values()))
    if args.json:
        Path(args.json).write_text(json.dumps({"model": package.name, "subjects": [s.id for s in subjects],
                                               "flagged_fraction": table, "command": _command_line(),
                                               "machine": _machine()}, indent=2) + "\n")
    return EXIT_OK


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate, format_table, synthetic_cases
    from .package import resolve_package

    from .evaluate import folder_cases
    from .pipeline import check_methods

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
        from .restoration import REFERENCE_RESTORATION
        for p, _ in runs:
            if "restoration" in p.methods:
                p.meta["restoration"] = {**p.meta.get("restoration", {}), **REFERENCE_RESTORATION}
    runs = [(p, ms) for p, ms in runs if ms]
    if bool(args.synthetic) == bool(args.cases):
        raise InputError("give either --synthetic DATA (healthy scans) or --cases DIR (cases with ground truth)")
    if args.synthetic:
        subjects = _subjects_of(package, args.synthetic, args.subjects)
        if args.limit:
            subjects = subjects[: args.limit]
        cases = synthetic_cases(subjects, per_subject=args.per_subject, seed=args.seed)
        case_set = {"kind": "synthetic", "data": str(args.synthetic), "subjects": args.subjects,
                    "per_subject": args.per_subject, "seed": args.seed}
        title = f"synthetic anomalies in the model's '{args.subjects}' subjects"
    else:
        cases = folder_cases(args.cases, args.image_name, args.label_name, args.mask_name)
        case_set = {"kind": "folder", "data": str(args.cases), "image": args.image_name, "label": args.label_name}
        title = args.title or f"cases in {args.cases} ({args.image_name})"
    result = evaluate(runs, cases, device=args.device,
                      progress=None if args.quiet else (lambda m: print(m, file=sys.stderr)))
    result["restoration_optimiser"] = args.restoration
    result["case_set"] = case_set
    result["title"] = title
    result["command"] = _command_line()
    result["machine"] = _machine()
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return EXIT_OK


def cmd_card(args: argparse.Namespace) -> int:
    from .modelcard import results_sections, write_card
    from .package import load_package

    package = load_package(args.model)
    if package.architecture.get("type") == "unet-brainmask":
        from .modelcard import render_brainmask_card
        from .package import CARD_FILE, write_manifest
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


def cmd_release(args: argparse.Namespace) -> int:
    """Turn a trained package into a shippable one: new name, optional float16 weights,
    descriptive metadata, recalibrated (the weights may have changed)."""
    import shutil
    from .calibrate import calibrate_package
    from .package import ANOMALY_TYPES, load_package, save_package, update_meta

    source = load_package(args.model)
    out = Path(args.out)
    if out.exists() and not args.force:
        raise InputError(f"{out} already exists; pass --force to replace it")
    model = source.load_model()
    if args.half:
        model = model.half()  # stored as float16; the engine computes in float32
    meta = json.loads(json.dumps(source.meta))
    if args.meta:
        meta.update(json.loads(Path(args.meta).read_text()))
    meta["name"] = out.name
    meta["calibration"] = {}
    meta.setdefault("provenance", {})["data"] = str(args.data)  # as given, not this machine's absolute path
    meta["weights_dtype"] = "float16" if args.half else "float32"
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        package = save_package(model, meta, tmp)
        subjects = []
        if package.architecture.get("type") in ANOMALY_TYPES:  # brain extraction models have no thresholds
            subjects = _subjects_of(package, args.data, "calibration")
            package = calibrate_package(package, subjects, device=args.device,
                                        progress=None if args.quiet else (lambda m: print(m, file=sys.stderr)))
            update_meta(package.path, package.meta)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # no half-made package left behind
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    calibrated = f", calibrated on {len(subjects)} subjects" if subjects else ""
    print(f"released {out} from {source.path} ({'float16' if args.half else 'float32'} weights){calibrated}")
    return EXIT_OK


def cmd_train_brainmask(args: argparse.Namespace) -> int:
    from .brainextract import train_brainmask

    train_brainmask(args.data, args.out, epochs=args.epochs, seed=args.seed, force=args.force,
                    arch={"slice_size": args.slice_size} if args.slice_size else None,
                    progress=None if args.quiet else (lambda m: print(m, file=sys.stderr)))
    print(f"wrote {args.out}")
    return EXIT_OK


def cmd_brainmask_dice(args: argparse.Namespace) -> int:
    import numpy as np
    from .brainextract import LESION_KINDS, LESION_RADIUS_MM, dice_on_subjects
    from .package import resolve_package

    package = resolve_package(args.model)
    if args.cases:
        # Case folders (e.g. BraTS): one image and one reference brain mask per sub-folder.
        from .data import Subject
        root = Path(args.data)
        subjects = [Subject(f.name, f / args.image_name, f / args.mask_name) for f in sorted(root.iterdir())
                    if (f / args.image_name).is_file() and (f / args.mask_name).is_file()]
        if not subjects:
            raise InputError(f"no sub-folder of {root} holds both {args.image_name} and {args.mask_name}")
        which = f"case folders ({args.image_name})"
    else:
        subjects = [s for s in _subjects_of(package, args.data, args.subjects) if s.mask is not None]
        which = f"'{args.subjects}' subjects"
    if args.engine_rule:
        which += ", the engine's own choice of brain mask"
    if args.with_lesion:
        if args.cases:
            raise InputError("--with-lesion needs healthy scans with reference masks, not --cases")
        which = f"{which} (each with a seeded tumour-like lesion)"
    records = dice_on_subjects(package, subjects, device=args.device,
                               progress=None if args.quiet else (lambda m: print(m, file=sys.stderr)),
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
        Path(args.json).write_text(json.dumps({**result, "command": _command_line(), "machine": _machine()},
                                              indent=2) + "\n")
    return EXIT_OK


def cmd_index(args: argparse.Namespace) -> int:
    """Write DIR/index.json: the default models and each package's pinned manifest hash."""
    from .package import ANOMALY_TYPES, MANIFEST_FILE, load_package, sha256_file

    folder = Path(args.folder)
    old = json.loads((folder / "index.json").read_text()) if (folder / "index.json").is_file() else {}
    (folder / "index.json").unlink(missing_ok=True)  # the packages are checked against their own manifests
    models = {}
    for sub in sorted(folder.iterdir()):
        if (sub / MANIFEST_FILE).is_file():
            p = load_package(sub)
            models[sub.name] = {"manifest_sha256": sha256_file(sub / MANIFEST_FILE), "type": p.architecture["type"]}
    anomaly = [n for n, m in models.items() if m["type"] in ANOMALY_TYPES]
    extraction = [n for n, m in models.items() if m["type"] not in ANOMALY_TYPES]
    index = {"default": args.default or old.get("default") or (anomaly[0] if anomaly else None),
             "brain_extraction": args.brain_extraction or old.get("brain_extraction") or
             (extraction[0] if extraction else None),
             "models": models}
    (folder / "index.json").write_text(json.dumps(index, indent=2) + "\n")
    print(f"wrote {folder / 'index.json'} ({len(models)} models)")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    from .device import DEVICES
    from .package import ALL_METHODS

    p = argparse.ArgumentParser(prog="anomaly-localizer",
                                description="Unsupervised anomaly localisation in brain MRI.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("score", help="heatmaps, segmentation and slice scores of one volume")
    s.add_argument("input", help="image file (NIfTI, NRRD, MHA, ...) or DICOM series folder")
    s.add_argument("--out", required=True, help="output folder (must not exist or must be empty, unless --force)")
    s.add_argument("--model", help="model name or package folder (default: the default installed model)")
    s.add_argument("--method", action="append", choices=None, metavar="M",
                   help=f"pixel score, repeatable: {', '.join(ALL_METHODS)} (default: all of the model's "
                        "except restoration); the first one makes the segmentation. lsr needs an LSR model "
                        "(chosen automatically when --model is not given)")
    s.add_argument("--mask", help="brain mask on the input's grid (label > 0 is brain)")
    s.add_argument("--brain-extraction", default="auto", metavar="auto|off|MODEL",
                   help="for a whole-head input without --mask: the built-in brain extraction (auto), "
                        "another brain extraction model, or off (refuse whole-head inputs)")
    s.add_argument("--threshold", type=float, help="heatmap threshold for the segmentation "
                   "(default: the model's calibrated 0.1 %% healthy false-positive threshold)")
    s.add_argument("--device", default="auto", choices=DEVICES, help="compute device (default: best available)")
    s.add_argument("--force", action="store_true", help="replace the output folder if it exists")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    s.set_defaults(func=cmd_score)

    m = sub.add_parser("models", help="list installed models")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_models)

    t = sub.add_parser("train", help="train a VAE or ceVAE on a folder of healthy scans")
    t.add_argument("data", help="folder of healthy scans (t1/ + brainmask/, or images with *_brainmask beside)")
    t.add_argument("--out", required=True, help="model package folder to create")
    t.add_argument("--config", help="JSON training configuration (keys of TrainConfig)")
    t.add_argument("--type", choices=["vae", "cevae"])
    t.add_argument("--slice-size", type=int)
    t.add_argument("--spacing", type=float, help="model pixel spacing in mm")
    t.add_argument("--latent-size", type=int)
    t.add_argument("--c", type=float, help="standard deviation of the Gaussian likelihood")
    t.add_argument("--epochs", type=int, help="maximum epochs")
    t.add_argument("--batch-size", type=int)
    t.add_argument("--seed", type=int)
    t.add_argument("--device", default="cpu", choices=DEVICES)
    t.add_argument("--cache", help="folder for prepared slices (default OUT/.cache)")
    t.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoint")
    t.add_argument("--force", action="store_true", help="start over in an existing OUT")
    t.add_argument("--no-calibration", action="store_true")
    t.add_argument("-q", "--quiet", action="store_true")
    t.set_defaults(func=cmd_train)

    c = sub.add_parser("calibrate", help="recalibrate a model's thresholds on healthy scans")
    c.add_argument("model", help="model name or folder")
    c.add_argument("data", help="folder of healthy scans")
    c.add_argument("--subjects", default="all", choices=["all", "calibration", "test", "val"],
                   help="which scans of DATA: all, or the model's recorded subjects of that set")
    c.add_argument("--out", help="write a recalibrated copy here")
    c.add_argument("--in-place", action="store_true", help="overwrite the model's own calibration")
    c.add_argument("--device", default="auto", choices=DEVICES)
    c.add_argument("-q", "--quiet", action="store_true")
    c.set_defaults(func=cmd_calibrate)

    f = sub.add_parser("fpr", help="share of healthy brain voxels the calibrated thresholds flag")
    f.add_argument("model", help="model name or folder")
    f.add_argument("data", help="folder of healthy scans")
    f.add_argument("--subjects", default="test", choices=["all", "calibration", "test", "val"],
                   help="the model's held-back test subjects by default")
    f.add_argument("--device", default="auto", choices=DEVICES)
    f.add_argument("--json")
    f.add_argument("-q", "--quiet", action="store_true")
    f.set_defaults(func=cmd_fpr)

    e = sub.add_parser("evaluate", help="pixel/slice AUROC, AP and Dice of every method on cases with ground truth")
    e.add_argument("model", help="model name or folder")
    e.add_argument("--synthetic", metavar="DATA", help="healthy scans to insert seeded synthetic anomalies into")
    e.add_argument("--cases", metavar="DIR", help="real cases: one sub-folder per case with image and label")
    e.add_argument("--image-name", default="image.nii.gz", help="image file in each case folder")
    e.add_argument("--label-name", default="label.nii.gz", help="ground-truth file in each case folder (> 0 = anomaly)")
    e.add_argument("--mask-name", help="brain mask file in each case folder (optional)")
    e.add_argument("--title", help="title of this case set in reports")
    e.add_argument("--subjects", default="test", choices=["all", "calibration", "test", "val"],
                   help="which of DATA's subjects (default: the model's held-back test subjects)")
    e.add_argument("--per-subject", type=int, default=2, help="synthetic cases per subject")
    e.add_argument("--limit", type=int, help="use only the first N subjects")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--device", default="auto", choices=DEVICES)
    e.add_argument("--also", action="append", metavar="MODEL",
                   help="another model whose methods join the table (repeatable), e.g. brain-t1-lsr")
    e.add_argument("--method", action="append", metavar="M", help="evaluate only these methods (repeatable)")
    e.add_argument("--restoration", choices=["package", "reference"], default="package",
                   help="restoration optimiser: the package's fast one, or the reference 500 gradient steps")
    e.add_argument("--json", help="also write the results as JSON")
    e.add_argument("-q", "--quiet", action="store_true")
    e.set_defaults(func=cmd_evaluate)

    k = sub.add_parser("card", help="write a model package's model card from its model.json and measured figures")
    k.add_argument("model", help="model package folder")
    k.add_argument("--evaluation", action="append", help="JSON written by `evaluate --json` (repeatable)")
    k.add_argument("--fpr", help="JSON written by `fpr --json`")
    k.add_argument("--dice", action="append",
                   help="JSON written by `brainmask-dice --json` (brain extraction models; repeatable)")
    k.set_defaults(func=cmd_card)

    r = sub.add_parser("release", help="make a shippable copy of a trained model (name, float16, metadata, calibration)")
    r.add_argument("model", help="trained model package folder")
    r.add_argument("--out", required=True, help="new package folder; its name becomes the model name")
    r.add_argument("--data", required=True, help="the healthy data the model was trained on (for recalibration)")
    r.add_argument("--meta", help="JSON merged into model.json (summary, description, data statement, ...)")
    r.add_argument("--half", action="store_true", help="store weights as float16 (half the size)")
    r.add_argument("--device", default="cpu", choices=DEVICES)
    r.add_argument("--force", action="store_true")
    r.add_argument("-q", "--quiet", action="store_true")
    r.set_defaults(func=cmd_release)

    b = sub.add_parser("train-brainmask", help="train the brain extraction U-Net on scans with reference masks")
    b.add_argument("data", help="folder of scans with brain masks (IXI layout or *_brainmask beside)")
    b.add_argument("--out", required=True)
    b.add_argument("--epochs", type=int, default=12)
    b.add_argument("--slice-size", type=int)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--force", action="store_true")
    b.add_argument("-q", "--quiet", action="store_true")
    b.set_defaults(func=cmd_train_brainmask)

    d = sub.add_parser("brainmask-dice", help="Dice of the brain extraction against reference masks")
    d.add_argument("model", help="brain extraction model name or folder")
    d.add_argument("data", help="folder of scans with reference brain masks (or of case folders, with --cases)")
    d.add_argument("--subjects", default="test", choices=["all", "calibration", "test", "val"])
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
    d.add_argument("--device", default="cpu", choices=DEVICES)
    d.add_argument("--json")
    d.add_argument("-q", "--quiet", action="store_true")
    d.set_defaults(func=cmd_brainmask_dice)

    i = sub.add_parser("index", help="pin the models of a folder in its index.json (after adding or changing one)")
    i.add_argument("folder", help="a models folder, e.g. models/")
    i.add_argument("--default", help="the default anomaly model")
    i.add_argument("--brain-extraction", help="the default brain extraction model")
    i.set_defaults(func=cmd_index)

    from . import benchmark, paper, restoration, smoothing, train_lsr
    benchmark.add_parser(sub)
    paper.add_parser(sub)
    train_lsr.add_parser(sub)
    restoration.add_parser(sub)
    smoothing.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s: %(message)s", stream=sys.stderr)
    try:
        return args.func(args)
    except CancelledError as exc:
        print(f"cancelled: {exc}", file=sys.stderr)
        return EXIT_CANCELLED
    except AnomalyLocalizerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:
        print("cancelled: interrupted", file=sys.stderr)
        return EXIT_CANCELLED


if __name__ == "__main__":
    sys.exit(main())
