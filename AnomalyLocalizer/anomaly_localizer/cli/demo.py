"""The README's demo: score a real brain with the shipped model, with and without a
synthetic lesion (darker than white matter, irregular and soft-edged, as a T1 shows a lesion:
:mod:`..tooling.evaluation.demo_lesion`), and write heatmaps, segmentations, slice scores and a
PNG overview with the segmentation at the model's default threshold.

The brain is the MNI ICBM152 2009 T1 template (1 mm) and its brain mask, which ship inside
the PyPI package nilearn (no download). Run: ``anomaly-localizer demo --out DIR`` (``make demo``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..tooling.evaluation.overview import write_overview
from ..tooling.evaluation.demo_lesion import insert_t1_lesion
from .common import EXIT_INPUT, EXIT_OK


def mni152(out: Path) -> tuple[Path, Path]:
    """Write nilearn's MNI152 T1 template and brain mask as NIfTI files into ``out``."""
    try:
        from nilearn import datasets
    except ImportError as exc:
        raise SystemExit("error: the demo needs nilearn (pip install 'anomaly-localizer[demo]')") from exc
    image, mask = out / "mni152_t1_1mm.nii.gz", out / "mni152_brainmask_1mm.nii.gz"
    datasets.load_mni152_template(resolution=1).to_filename(str(image))
    datasets.load_mni152_brain_mask(resolution=1).to_filename(str(mask))
    return image, mask


def register(sub) -> None:
    p = sub.add_parser("demo", help="score a real brain (MNI152 template) with and without a synthetic lesion, "
                                    "and draw an overview (the README's quick start)")
    p.add_argument("--out", default="demo-output",
                   help="folder for everything the demo writes (an earlier demo output there is replaced)")
    p.add_argument("--model", help="model name or folder (default: the shipped default model)")
    p.add_argument("--seed", type=int, default=7, help="seed of the synthetic lesion")
    p.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    from .score import score_file

    out = Path(args.out)
    if out.exists():
        # Replace only an earlier demo's output (or an empty folder): never a user's folder.
        known = {"inputs", "healthy", "lesion", "overview.png"}
        if not out.is_dir() or not {p.name for p in out.iterdir()} <= known:
            print(f"error: {out} exists and is not an earlier demo output; choose another --out", file=sys.stderr)
            return EXIT_INPUT
        shutil.rmtree(out)
    (out / "inputs").mkdir(parents=True)
    image_path, mask_path = mni152(out / "inputs")

    image = sitk.ReadImage(str(image_path), sitk.sitkFloat32)
    arr = sitk.GetArrayFromImage(image)
    brain = sitk.GetArrayFromImage(sitk.ReadImage(str(mask_path))) > 0
    lesioned, label = insert_t1_lesion(arr, brain, image.GetSpacing()[::-1], np.random.default_rng(args.seed))
    lesion_path, label_path = out / "inputs" / "mni152_t1_1mm_lesion.nii.gz", out / "inputs" / "lesion_truth.nii.gz"
    for arr_out, path in ((lesioned, lesion_path), (label, label_path)):
        img = sitk.GetImageFromArray(arr_out)
        img.CopyInformation(image)
        sitk.WriteImage(img, str(path))

    for name, path in (("healthy", image_path), ("lesion", lesion_path)):
        print(f"scoring {path.name} -> {out / name}", file=sys.stderr)
        score_file(str(path), str(out / name), model=args.model, mask=str(mask_path), quiet=True, contrasts=["t1"])
    png = write_overview([("healthy template", image_path, out / "healthy"),
                          ("template + synthetic lesion", lesion_path, out / "lesion")],
                         out / "overview.png", truth={"template + synthetic lesion": label_path},
                         scan_note="Scans: the MNI152 template (an average of 152 healthy adult brains) and the same "
                                   "template with one synthetic lesion, darker than white matter as on a T1",
                         notes={"healthy template": "An average of 152 brains is smoother than any scan: what is "
                                                    "raised on it (ventricles, midline) is that, not disease."})
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "lesion" / "segmentation.nii.gz"))) > 0
    seg_h = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "healthy" / "segmentation.nii.gz"))) > 0
    truth = label > 0
    dice = 2 * (seg & truth).sum() / max(1, seg.sum() + truth.sum())
    s = json.loads((out / "lesion" / "summary.json").read_text())
    print(f"lesion: {int(truth.sum())} voxels inserted; segmentation ({s['threshold']['method']} above anomaly level "
          f"{s['threshold']['level']:.3g}, {s['threshold']['meaning']}) flags {int(seg.sum())} voxels, "
          f"{int((seg & truth).sum())} of them in the lesion (Dice {dice:.2f}); "
          f"healthy scan: {int(seg_h.sum())} voxels flagged ({100 * seg_h.sum() / brain.sum():.2f} % of the brain)")
    print(f"wrote {out}/ (healthy/, lesion/, inputs/) and {png}")
    return EXIT_OK
