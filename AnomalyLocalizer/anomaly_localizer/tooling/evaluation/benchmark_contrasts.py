"""``anomaly-localizer benchmark --contrasts``: seconds of ``score`` end to end (reading,
contrast recognition, brain mask, model choice, scoring, writing the results folder) on a
1 mm study of one contrast and of two, and the share of each run spent outside scoring
(scoring: ``summary.json``'s ``timings_s.total_s``, the networks and maps, plus
``brain_extraction_s`` where the brain was extracted).

Cases, from an IXI folder and a folder of its renderings (:mod:`..rendering`): the first
test subject's T1 resampled to a 1 mm 256x256x180 axial grid (whole head: the brain is
extracted), its FLAIR rendering on the same grid (brain only, with its mask), its T2 and T1c
renderings where the folder has them (with the same mask), and T1 + FLAIR together as a
study (the brain extracted from the T1). The model is the one the engine chooses for each
study's contrasts. Each is run ``repeats`` times in this process after one warm-up; the
median is reported. A command that prints figures, not a test.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import SimpleITK as sitk

from ...core.scoring import score_study
from ...errors import InputError
from ..data import find_subjects
from .benchmark import one_mm_grid


def _write_cases(data: Path, renders: Path, folder: Path) -> dict[str, list[tuple[Path, str, Path | None]]]:
    t1_subjects = find_subjects(data)
    rendered_all = {s.id: s for s in find_subjects(renders)}
    rendered = {k: s for k, s in rendered_all.items() if s.contrast == "flair"}
    pick = next((s for s in t1_subjects if f"{s.id}~flair~0" in rendered), None)
    if pick is None:
        raise InputError(f"no subject of {data} has a FLAIR rendering in {renders}; make them with "
                         "anomaly-localizer render")
    flair = rendered[f"{pick.id}~flair~0"]
    others = {c: rendered_all[f"{pick.id}~{c}~0"] for c in ("t2", "t1c") if f"{pick.id}~{c}~0" in rendered_all}
    source = sitk.ReadImage(str(pick.image), sitk.sitkFloat32)
    grid = one_mm_grid(source)  # an empty 1 mm grid around the head
    t1 = sitk.Resample(source, grid, sitk.Transform(), sitk.sitkLinear, 0.0)
    fl = sitk.Resample(sitk.ReadImage(str(flair.image), sitk.sitkFloat32), grid, sitk.Transform(), sitk.sitkLinear, 0.0)
    mask = sitk.Resample(sitk.ReadImage(str(flair.mask)), grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    paths = {"t1": folder / "t1_1mm.nii.gz", "flair": folder / "flair_1mm.nii.gz", "mask": folder / "mask_1mm.nii.gz"}
    sitk.WriteImage(t1, str(paths["t1"]))
    sitk.WriteImage(fl, str(paths["flair"]))
    sitk.WriteImage(mask, str(paths["mask"]))
    cases = {"T1 (1 mm whole head)": [(paths["t1"], "t1", None)],
             "FLAIR (1 mm, brain mask given)": [(paths["flair"], "flair", paths["mask"])]}
    for c, subject in others.items():
        paths[c] = folder / f"{c}_1mm.nii.gz"
        sitk.WriteImage(sitk.Resample(sitk.ReadImage(str(subject.image), sitk.sitkFloat32), grid, sitk.Transform(),
                                      sitk.sitkLinear, 0.0), str(paths[c]))
        cases[f"{ {'t2': 'T2', 't1c': 'T1c'}[c]} (1 mm, brain mask given)"] = [(paths[c], c, paths["mask"])]
    return {**cases,
            "T1 + FLAIR (1 mm, brain extracted from the T1)": [(paths["t1"], "t1", None), (paths["flair"], "flair", None)]}


def run_contrast_benchmark(data: str | Path, renders: str | Path, repeats: int = 3, device: str = "cpu",
                           progress: Callable[[str], None] | None = None) -> dict:
    """Median seconds of ``score`` end to end per study kind, with the model chosen for it."""
    say = progress or (lambda m: None)
    work = Path(tempfile.mkdtemp(prefix="anomaly-localizer-bench-"))
    try:
        cases = _write_cases(Path(data), Path(renders), work)
        rows = {}
        for name, inputs in cases.items():
            mask = next((m for _, _, m in inputs if m is not None), None)
            times, scoring, summary = [], [], None
            for k in range(repeats + 1):  # the first run warms caches and loads the libraries
                out = work / f"out-{len(rows)}-{k}"
                t0 = time.perf_counter()
                summary = score_study([p for p, _, _ in inputs], out, contrasts=[c for _, c, _ in inputs],
                                      mask=mask, device=device)
                if k:
                    times.append(time.perf_counter() - t0)
                    t = summary["timings_s"]  # scoring: the networks and maps, and brain extraction where it ran
                    scoring.append(float(t.get("total_s", 0.0)) + float(t.get("brain_extraction_s", 0.0)))
                shutil.rmtree(out, ignore_errors=True)
            outside = [(t - s) / t for t, s in zip(times, scoring)]
            rows[name] = {"seconds_median": statistics.median(times), "seconds": times,
                          "scoring_seconds_median": statistics.median(scoring),
                          "outside_scoring_share_median": statistics.median(outside),
                          "model": summary["model"]["name"], "contrasts_read": summary["contrasts_read"],
                          "methods": summary["methods"]}
            say(f"{name}: {rows[name]['seconds_median']:.1f} s with {rows[name]['model']}")
        return {"cases": rows, "repeats": repeats, "device": device}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def format_contrast_benchmark(result: dict) -> str:
    lines = [f"score end to end (read, recognise, brain mask, choose the model, score, write), median of "
             f"{result['repeats']} runs after a warm-up, device {result['device']}; outside scoring: the share of "
             "the run spent reading, choosing, hashing, summarising and writing (aim: at most 20 %):"]
    for name, r in result["cases"].items():
        share = r.get("outside_scoring_share_median")
        outside = f" ({100 * share:.0f} % outside scoring)" if share is not None else ""
        lines.append(f"  {name:<48} {r['seconds_median']:6.1f} s{outside}  model {r['model']} "
                     f"(reads {' + '.join(r['contrasts_read'])}; maps {', '.join(r['methods'])})")
    return "\n".join(lines)
