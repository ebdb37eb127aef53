"""``benchmark --worst-case``: every method of every installed anomaly model timed on the
scans where scoring costs most, each measurement in a fresh child process so its peak
memory is its own; and the whole ``score`` command end to end on a 1 mm whole-head scan.

Cases: a 1 mm 256x256x180 scan (the first IXI subject resampled) with a large synthetic
lesion (a 25-30 mm intensity change), the first BraTS case (T1c, 240x240x155 at 1 mm, a
contrast no model was trained on), and the MNI152 template at 1 mm (an average brain,
unlike any single scan). The five VAE maps are also timed the reference way (each method on
its own, every axial slice), for the ratio. Prints figures; not a test.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk

from ...core.device import usable_cores
from ...core.imageio import read_image, write_image
from ...core.scores import PIXEL_METHODS
from ...errors import InputError
from .benchmark import one_mm_grid

LESION_RADIUS_MM = (25.0, 30.0)


def make_cases(data: Path, folder: Path) -> dict[str, tuple[Path, Path | None]]:
    """Write the worst-case scans (image, brain mask) into ``folder``; name -> paths."""
    from ...tooling.evaluation.synthetic import insert_anomaly
    ixi = data / "ixi_t1_2mm"
    t1s = sorted((ixi / "t1").glob("*.nii.gz"))
    if not t1s:
        raise InputError(f"no ixi_t1_2mm/t1/*.nii.gz under {data}; pass --data pointing at ../shared/data")
    img = read_image(t1s[0])
    msk = read_image(ixi / "brainmask" / t1s[0].name.replace("_T1", "_brainmask"), "MASK")
    ref = one_mm_grid(img)
    head = sitk.Resample(img, ref, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    brain = sitk.Resample(msk, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    arr, mask = sitk.GetArrayFromImage(head), sitk.GetArrayFromImage(brain) > 0
    lesioned, _ = insert_anomaly(arr, mask, (1.0, 1.0, 1.0), "shift_up", np.random.default_rng(0), LESION_RADIUS_MM)
    cases: dict[str, tuple[Path, Path | None]] = {}
    out = sitk.GetImageFromArray(lesioned.astype(np.float32))
    out.CopyInformation(head)
    write_image(out, folder / "lesioned.nii.gz")
    write_image(brain, folder / "lesioned_mask.nii.gz")
    cases["1 mm lesioned (IXI, 25-30 mm lesion)"] = (folder / "lesioned.nii.gz", folder / "lesioned_mask.nii.gz")
    write_image(head, folder / "head.nii.gz")
    brats = sorted(p for p in (data / "brats2015_t1c_flair").glob("*") if (p / "T1c_subtrMeanDivStd.nii.gz").is_file())
    if brats:
        cases[f"BraTS {brats[0].name} T1c"] = (brats[0] / "T1c_subtrMeanDivStd.nii.gz", brats[0] / "brainmask.nii.gz")
    try:
        from nilearn import datasets
        datasets.load_mni152_template(resolution=1).to_filename(str(folder / "mni152.nii.gz"))
        datasets.load_mni152_brain_mask(resolution=1).to_filename(str(folder / "mni152_mask.nii.gz"))
        cases["MNI152 1 mm (unfamiliar)"] = (folder / "mni152.nii.gz", folder / "mni152_mask.nii.gz")
    except ImportError:
        pass
    return cases


def _measure(queue, model: str, methods: list[str], image: str, mask: str | None, reference: bool) -> None:
    """Child process: score once, cold as a user's run is (model loaded, no warm-up run);
    report seconds and peak RSS."""
    try:
        from ...core.device import configure_threads
        from ...core.package import resolve_package
        from ...core.pipeline import score_volume
        configure_threads()
        package = resolve_package(model)
        net = package.load_model("cpu")
        img = read_image(image)
        msk = read_image(mask, "MASK") if mask else None
        t0 = time.perf_counter()
        res = score_volume(img, package, methods, mask=msk, device="cpu", model=net)
        seconds = time.perf_counter() - t0
        row = {"seconds": seconds, "scored_slices": res.info["scored_slices"],
               "timings": {k: round(v, 3) for k, v in res.timings.items()}, "lsr": res.info.get("lsr")}
        if reference:
            from ...core.volume import brain_mask
            from .benchmark import reference_way
            row["reference_seconds"] = reference_way(img, brain_mask(img, msk), package, net, "cpu")
        row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        queue.put(row)
    except BaseException as exc:  # reported, not raised: the other measurements go on
        queue.put({"error": f"{type(exc).__name__}: {exc}"})


def measure_in_child(model: str, methods: list[str], image: Path, mask: Path | None, reference: bool = False) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_measure, args=(queue, model, methods, str(image), str(mask) if mask else None,
                                               reference))
    child.start()
    row = queue.get()
    child.join()
    return row


def method_groups() -> list[tuple[str, list[str]]]:
    """(model, methods) to time: each installed anomaly model's default methods, and its
    opt-in ones on their own (restoration)."""
    from ...core.installed import scan_packages
    good, _ = scan_packages()
    groups = []
    for p in good:
        if p.detector is None:
            continue
        defaults = p.default_methods()
        groups.append((p.name, defaults))
        groups += [(p.name, [m]) for m in p.methods if m not in defaults and not p.detector.composite]
    return groups


def end_to_end(head: Path, folder: Path) -> dict:
    """Wall time of ``anomaly-localizer score`` on a whole-head scan (brain extraction, the
    default model's default methods, writing), start-up included, and its own timings."""
    out = folder / "e2e"
    t0 = time.perf_counter()
    command = "from anomaly_localizer.cli import main; raise SystemExit(main())"
    done = subprocess.run([sys.executable, "-c", command, "score", str(head), "--out", str(out), "-q"],
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        return {"error": done.stderr.strip()[-300:]}
    summary = json.loads((out / "summary.json").read_text())
    found = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "brainmask.nii.gz"))) > 0
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "lesioned_mask.nii.gz"))) > 0
    dice = 2 * float((found & truth).sum()) / max(1, int(found.sum() + truth.sum()))
    return {"wall_seconds": wall, "timings": summary["timings_s"], "brain_mask_source": summary["brain_mask_source"],
            "brain_extraction_dice": dice, "model": summary["model"]["name"]}


def run_worst_case(data: str | Path, json_path: str | None = None,
                   say: Callable[[str], None] | None = print) -> dict:
    data = Path(data)
    with tempfile.TemporaryDirectory(prefix="anomaly-localizer-worst-") as tmp:
        folder = Path(tmp)
        cases = make_cases(data, folder)
        rows = []
        e2e = end_to_end(folder / "head.nii.gz", folder)
        if say:
            say("score, end to end, 1 mm whole head 256x256x180: " + (
                f"{e2e['wall_seconds']:.1f} s wall (start-up and writing included; reading "
                f"{e2e['timings'].get('read', 0.0):.1f} s, scoring {e2e['timings']['total_s']:.1f} s: "
                + ", ".join(f"{k} {v:.1f}" for k, v in e2e["timings"].items() if k not in ("read", "total_s"))
                + f"); brain extraction Dice {e2e['brain_extraction_dice']:.3f} against the reference mask"
                if "error" not in e2e else e2e["error"]))
        for case, (image, mask) in cases.items():
            for model, methods in method_groups():
                reference = sorted(methods) == sorted(PIXEL_METHODS)
                row = {"case": case, "model": model, "methods": methods,
                       **measure_in_child(model, methods, image, mask, reference)}
                rows.append(row)
                if say:
                    if "error" in row:
                        say(f"{case} | {model} {'+'.join(methods)}: failed: {row['error']}")
                    else:
                        ratio = (f"; reference way {row['reference_seconds']:.1f} s, "
                                 f"{row['reference_seconds'] / row['seconds']:.1f}x" if "reference_seconds" in row
                                 else "")
                        say(f"{case} | {model} {'+'.join(methods)}: {row['seconds']:.1f} s, "
                            f"{row['scored_slices']} slices, peak {row['peak_rss_mb']:.0f} MB{ratio}")
    result = {"end_to_end": e2e, "rows": rows, "cpu_threads": usable_cores()}
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
    return result
