"""Build a folder of 20 scans to try ``anomaly-localizer screen`` on, from ../shared/data:
healthy IXI scans the default model never saw (its held-out test subjects), two of them as
DICOM series, the four BraTS tumour cases (contrast-enhanced T1), the MNI152 template from
nilearn as NRRD, and one corrupt (truncated) file.

    python examples/screening_folder.py --data ../shared/data --out /tmp/screen-20
    anomaly-localizer screen /tmp/screen-20 --out /tmp/screen-20-worklist

The folder is scratch data outside the repository (the data's licences do not allow
copies in it); delete it when done.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk


def write_dicom_series(image: sitk.Image, folder: Path, uid: str) -> None:
    """One axial DICOM file per slice (int16), with the geometry tags ITK reads back."""
    image = sitk.DICOMOrient(image, "LPS")  # index axes towards L, P, S: slices are axial
    arr = sitk.GetArrayFromImage(image)
    lo, hi = float(arr.min()), float(arr.max())
    scale = 3000.0 / (hi - lo) if hi > lo else 1.0
    arr = np.round((arr - lo) * scale).astype(np.int16)
    folder.mkdir(parents=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    d = np.array(image.GetDirection()).reshape(3, 3)
    orientation = "\\".join(f"{v:.6f}" for v in (*d[:, 0], *d[:, 1]))
    for k in range(arr.shape[0]):
        s = sitk.GetImageFromArray(arr[k])
        s.SetSpacing(image.GetSpacing()[:2])
        pos = image.TransformIndexToPhysicalPoint((0, 0, k))
        for tag, value in [("0020|000e", uid), ("0020|000d", uid + ".1"), ("0008|0060", "MR"),
                           ("0020|0032", "\\".join(f"{p:.4f}" for p in pos)), ("0020|0037", orientation),
                           ("0020|0013", str(k + 1)), ("0018|0050", f"{image.GetSpacing()[2]:.4f}"),
                           ("0028|0030", "\\".join(f"{v:.4f}" for v in image.GetSpacing()[1::-1]))]:
            s.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k:04d}.dcm"))
        writer.Execute(s)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="../shared/data", help="the shared data folder (ixi_t1_2mm, brats2015_t1c_flair)")
    p.add_argument("--out", required=True, help="new folder for the 20 scans")
    p.add_argument("--model", help="model whose held-out test subjects are used (default: the default model)")
    args = p.parse_args()
    from anomaly_localizer.core.package import resolve_package

    out, data = Path(args.out), Path(args.data)
    if out.exists():
        sys.exit(f"{out} exists; give a new folder")
    test = resolve_package(args.model).meta["provenance"]["subjects"]["test"]
    ixi = [data / "ixi_t1_2mm" / "t1" / f"{s}_T1.nii.gz" for s in test]
    ixi = [f for f in ixi if f.is_file()][:15]
    if len(ixi) < 15:
        sys.exit(f"{data / 'ixi_t1_2mm'} holds only {len(ixi)} of the model's test subjects; 15 are needed")
    (out / "ixi").mkdir(parents=True)
    for f in ixi[:12]:
        (out / "ixi" / f.name).write_bytes(f.read_bytes())
    for i, f in enumerate(ixi[12:14]):
        write_dicom_series(sitk.ReadImage(str(f)), out / "dicom" / f.name.split("_")[0],
                           f"1.2.826.0.1.3680043.2.1125.77.{i + 1}")
    broken = ixi[14].read_bytes()
    (out / "ixi" / "broken_T1.nii.gz").write_bytes(broken[: len(broken) // 3])
    (out / "brats").mkdir()
    for case in sorted((data / "brats2015_t1c_flair").iterdir()):
        t1c = case / "T1c_subtrMeanDivStd.nii.gz"
        if t1c.is_file():
            (out / "brats" / f"{case.name}_T1c.nii.gz").write_bytes(t1c.read_bytes())
    from nilearn.datasets import load_mni152_template
    mni = load_mni152_template(resolution=1)
    sitk.WriteImage(_from_nibabel(mni), str(out / "mni152.nrrd"))
    n = sum(1 for _ in (out / "ixi").iterdir()) + sum(1 for _ in (out / "dicom").iterdir()) + \
        sum(1 for _ in (out / "brats").iterdir()) + 1
    print(f"wrote {n} scans into {out}")
    return 0


def _from_nibabel(img) -> sitk.Image:
    """A nibabel image as SimpleITK (RAS affine to LPS)."""
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "t.nii.gz"
        img.to_filename(str(path))
        return sitk.ReadImage(str(path))


if __name__ == "__main__":
    raise SystemExit(main())
