"""``score`` (one volume into a results folder) and ``models`` (what is installed)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ..core.contrast import CONTRASTS
from .common import EXIT_OK, add_device, add_quiet, progress_printer


def register(sub) -> None:
    from ..core.detectors import all_detectors

    methods = ", ".join(m for d in all_detectors() for m in d.methods)
    s = sub.add_parser("score", help="heatmaps, segmentation and slice scores of one volume")
    s.add_argument("input", nargs="+", help="image file (NIfTI, NRRD, MHA, ...) or DICOM series folder; several "
                   "co-registered scans of one study (e.g. T1 and FLAIR): the maps are written on the first one's grid")
    s.add_argument("--contrast", action="append", metavar="C",
                   help=f"contrast of each input in order ({', '.join(CONTRASTS)}), repeatable; default: from "
                        "the DICOM header, else recognised from the image (refused when it cannot tell)")
    s.add_argument("--out", required=True, help="output folder (must not exist or must be empty, unless --force)")
    s.add_argument("--model", help="model name or package folder (default: the installed model that reads the "
                   "inputs' contrasts, using most of them)")
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
                      args.threshold_level, args.device, args.force, args.quiet, contrasts=args.contrast)


def score_file(input: str | list[str], out: str, model: str | None = None, methods: list[str] | None = None,
               mask: str | None = None, brain_extraction: str = "auto", threshold: float | None = None,
               threshold_level: float | None = None, device: str = "auto", force: bool = False,
               quiet: bool = False, contrasts: list[str] | None = None) -> int:
    """The ``score`` command: one study (one or more files) into a results folder
    (:func:`anomaly_localizer.core.scoring.score_study`), with what a reader needs said on stderr."""
    from ..core.scoring import score_study

    t0 = time.perf_counter()
    inputs = [input] if isinstance(input, str) else list(input)
    written = score_study(inputs, out, contrasts=contrasts, model=model, methods=methods, mask=mask,
                          brain_extraction=brain_extraction, threshold=threshold, threshold_level=threshold_level,
                          device=device, force=force, progress=progress_printer(quiet))
    for line in written.get("input_notes", []) + written.get("run_notes", []):  # shown even with -q
        print(f"note: {line}", file=sys.stderr)
    note = written.get("note")
    if note:  # shown even with -q, one line: it changes how to read the result
        print(f"note: {note}", file=sys.stderr)
    shadows = written["model"].get("shadows")
    if shadows:
        print(f"note: model {written['model']['name']} from {written['model']['path']} is used; it shadows "
              f"{', '.join(shadows)}", file=sys.stderr)
    if not quiet:
        from ..core.findings import describe_findings
        level = written["threshold"]["level"]
        below = written.get("below_finding_rule", {}).get("count", 0)
        print(f"findings at anomaly level {level:.3g} ({len(written['findings'])}; all in {out}/findings.csv):\n"
              + "\n".join("  " + line for line in describe_findings(written["findings"]).splitlines())
              + (f"\n  ({below} smaller region{'s' * (below != 1)} below the finding rule, as healthy brains show: "
                 "in the segmentation, not listed)" if below else ""), file=sys.stderr)
        print(f"PROGRESS 100.0 wrote {out} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return EXIT_OK


def run_models(args: argparse.Namespace) -> int:
    from ..core.package import default_model_name
    from ..core.installed import scan_packages

    default = default_model_name()
    good, broken = scan_packages()
    rows = [{"name": p.name, "path": str(p.path), "default": p.name == default, "ok": True,
             "summary": p.meta.get("summary", ""), "contrasts": list(p.contract.contrasts),
             "optional_contrasts": list(p.contract.optional_contrasts), "methods": list(p.methods),
             "shadows": p.shadows} for p in good]
    rows += [{"name": path.name, "path": str(path), "default": False, "ok": False, "error": reason}
             for path, reason in broken]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            flag = "*" if r["default"] else " "
            if r["ok"]:
                reads = " + ".join(c + ("?" if c in r["optional_contrasts"] else "") for c in r["contrasts"])
                state = f"[{reads}] " + r["summary"] + (f" (methods: {', '.join(r['methods'])})" if r["methods"] else "")
                if r["shadows"]:
                    state += f" [shadows {', '.join(r['shadows'])}]"
            else:
                state = f"BROKEN (skipped): {r['error']}"
            print(f"{flag} {r['name']:<24} {state}  [{r['path']}]")
        if not rows:
            print("no models installed (see README, 'Models')")
    return EXIT_OK
