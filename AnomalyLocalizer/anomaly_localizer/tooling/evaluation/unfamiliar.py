"""Healthy T1 scans from other sources than the training scans, laid out for ``fpr``: Colin27
(one adult scanned 27 times and averaged, 1 mm, skull-stripped: Debian's ``mricron-data``,
``/usr/share/mricron/templates/ch2bet.nii.gz``) and the MNI152 2009 template (an average of 152
brains, bundled in nilearn). ``fpr MODEL OUT/colin27 --subjects all`` then says what share of
such a brain each map flags at its default threshold (docs/results.md)."""

from __future__ import annotations

from pathlib import Path

import SimpleITK as sitk

from ...errors import InputError

COLIN27 = Path("/usr/share/mricron/templates/ch2bet.nii.gz")


def write_unfamiliar_scans(out: Path, colin27: Path = COLIN27) -> list[Path]:
    """Write ``out/colin27/`` and ``out/mni152/`` (each one scan and its ``_brainmask``); the
    folders written. Colin27's brain is its non-zero region with holes filled; MNI152's mask
    is nilearn's. A missing source is said with how to get it."""
    out = Path(out)
    if not colin27.is_file():
        raise InputError(f"{colin27} is missing: install Debian's mricron-data (apt install mricron-data), or "
                         "give --colin27 PATH to a skull-stripped Colin27 T1")
    try:
        from nilearn import datasets
    except ImportError:
        raise InputError("nilearn is missing (the MNI152 template); install the demo's extras: "
                         "pip install 'anomaly-localizer[demo]'") from None
    written = []
    folder = out / "colin27"
    folder.mkdir(parents=True, exist_ok=True)
    image = sitk.ReadImage(str(colin27), sitk.sitkFloat32)
    brain = sitk.BinaryFillhole(sitk.Cast(image > 0, sitk.sitkUInt8))
    sitk.WriteImage(image, str(folder / "colin27.nii.gz"), True)
    sitk.WriteImage(brain, str(folder / "colin27_brainmask.nii.gz"), True)
    written.append(folder)
    folder = out / "mni152"
    folder.mkdir(parents=True, exist_ok=True)
    datasets.load_mni152_template(resolution=1).to_filename(str(folder / "mni152.nii.gz"))
    datasets.load_mni152_brain_mask(resolution=1).to_filename(str(folder / "mni152_brainmask.nii.gz"))
    written.append(folder)
    return written
