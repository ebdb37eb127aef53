"""``score`` (one volume into a results folder) and ``models`` (what is installed)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .common import EXIT_OK, add_device, add_quiet, progress_printer


def register(sub) -> None:
    from ..core.detectors import all_detectors

    methods = ", ".join(m for d in all_detectors() for m in d.methods)
    s = sub.add_parser("score", help="heatmaps, segmentation and slice scores of one volume")
    s.add_argument("input", help="image file (NIfTI, NRRD, MHA, ...) or DICOM series folder")
    s.add_argument("--out", required=True, help="output folder (must not exist or must be empty, unless --force)")
    s.add_argument("--model", help="model name or package folder (default: the default installed model)")
    s.add_argument("--method", action="append", metavar="M",
                   help=f"pixel score, repeatable: {methods} (default: all of the model's except opt-in ones such as "
                        "restoration); the first one makes the segmentation. A method of another model family "
                        "(e.g. lsr) picks a model that offers it when --model is not given")
    s.add_argument("--mask", help="brain mask on the input's grid (label > 0 is brain)")
    s.add_argument("--brain-extraction", default="auto", metavar="auto|off|MODEL",
                   help="for a whole-head input without --mask: the built-in brain extraction (auto), "
                        "another brain extraction model, or off (refuse whole-head inputs)")
    s.add_argument("--threshold", type=float, help="heatmap threshold for the segmentation as a raw score "
                   "(default: the model's calibrated 0.1 %% healthy false-positive threshold)")
    s.add_argument("--threshold-level", type=float, metavar="LEVEL",
                   help="the threshold as an anomaly level instead (1.0 = the model's 0.01 %% healthy "
                        "false-positive threshold; for an uncalibrated map, its maximum)")
    add_device(s)
    s.add_argument("--force", action="store_true", help="replace the output folder if it exists")
    add_quiet(s)
    s.set_defaults(func=run_score)

    m = sub.add_parser("models", help="list installed models")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=run_models)


def run_score(args: argparse.Namespace) -> int:
    return score_file(args.input, args.out, args.model, args.method, args.mask, args.brain_extraction, args.threshold,
                      args.threshold_level, args.device, args.force, args.quiet)


def score_file(input: str, out: str, model: str | None = None, methods: list[str] | None = None,
               mask: str | None = None, brain_extraction: str = "auto", threshold: float | None = None,
               threshold_level: float | None = None, device: str = "auto", force: bool = False,
               quiet: bool = False) -> int:
    """The ``score`` command: one image file into a results folder."""
    from ..core.imageio import as_3d, read_image
    from ..core.installed import check_methods, resolve_package_for
    from ..core.pipeline import score_volume
    from ..core.results import (
        check_output_dir,
        check_threshold_options,
        resolve_threshold,
        run_summary,
        write_results,
    )

    t0 = time.perf_counter()
    out = Path(out)
    # Everything that can be refused is checked before any work and before any write.
    check_output_dir(out, force)
    package = resolve_package_for(methods, model)
    methods = check_methods(methods or package.default_methods(), package)
    check_threshold_options(package, methods[0], threshold, threshold_level)
    image = as_3d(read_image(input, "INPUT"))
    mask_image = as_3d(read_image(mask, "MASK")) if mask else None
    t_read = time.perf_counter() - t0

    result = score_volume(image, package, methods, mask=mask_image, device=device,
                          progress=progress_printer(quiet), brain_extraction=brain_extraction)
    chosen = resolve_threshold(package, result, methods[0], threshold, threshold_level)
    summary = run_summary(package, result, chosen, input=str(Path(input).resolve()),
                          mask=str(Path(mask).resolve()) if mask else None)
    summary["timings_s"] = {"read": t_read, **summary["timings_s"]}
    t_write = time.perf_counter()
    written = write_results(out, image, result, chosen, summary, force=force)
    note = written.get("note")
    if note:  # shown even with -q, as one line: it changes how to read the result
        from ..core.levels import first_sentences
        print(f"note: {first_sentences(note)} (the whole note: 'note' in {out}/summary.json)", file=sys.stderr)
    if package.shadows:
        print(f"note: model {package.name} from {package.path} is used; it shadows {', '.join(package.shadows)}",
              file=sys.stderr)
    if not quiet:
        from ..core.findings import describe_findings
        print(f"findings at anomaly level {chosen.level:.3g} ({len(written['findings'])}; all in {out}/findings.csv):\n"
              + "\n".join("  " + line for line in describe_findings(written["findings"]).splitlines()),
              file=sys.stderr)
    if not quiet:
        print(f"PROGRESS 100.0 wrote {out} in {time.perf_counter() - t0:.1f} s "
              f"(writing {time.perf_counter() - t_write:.1f} s)", file=sys.stderr)
    return EXIT_OK


def run_models(args: argparse.Namespace) -> int:
    from ..core.package import default_model_name
    from ..core.installed import scan_packages

    default = default_model_name()
    good, broken = scan_packages()
    rows = [{"name": p.name, "path": str(p.path), "default": p.name == default, "ok": True,
             "summary": p.meta.get("summary", ""), "methods": list(p.methods), "shadows": p.shadows} for p in good]
    rows += [{"name": path.name, "path": str(path), "default": False, "ok": False, "error": reason}
             for path, reason in broken]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            flag = "*" if r["default"] else " "
            if r["ok"]:
                state = r["summary"] + (f" (methods: {', '.join(r['methods'])})" if r["methods"] else "")
                if r["shadows"]:
                    state += f" [shadows {', '.join(r['shadows'])}]"
            else:
                state = f"BROKEN (skipped): {r['error']}"
            print(f"{flag} {r['name']:<24} {state}  [{r['path']}]")
        if not rows:
            print("no models installed (see README, 'Models')")
    return EXIT_OK
