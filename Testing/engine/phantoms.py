"""Test helpers: a tiny random-initialised model package and synthetic brain phantoms.

Nothing here reads ../shared: engine tests run on a fresh clone.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch

from anomaly_localizer.core.package import build_network as build_model
from anomaly_localizer.core.package import save_package
from anomaly_localizer.core.scores import PIXEL_METHODS
from anomaly_localizer.core.volume import NORMALISATION

TINY_ARCH = {"type": "vae", "slice_size": 32, "feature_maps": [4, 8], "latent_size": 8, "likelihood_std": 1.0}
TINY_CONTRACT = {"modality": "T1w", "orientation": "axial", "slice_size": 32, "spacing_mm": 6.0,
                 "normalisation": NORMALISATION}

# A calibration for tiny models: thresholds for three healthy false-positive rates, a rate curve
# and slice-score percentiles, so that levels, rates and percentiles can be shown.
TINY_CALIBRATION = {"default_fpr": 0.001, "pixel": {m: {"n_subjects": 3, "thresholds": [
    {"fpr": 0.01, "value": 0.01}, {"fpr": 0.001, "value": 0.02}, {"fpr": 0.0001, "value": 0.05}],
    "curve": {"fpr": [0.1, 0.01, 0.001, 0.0001], "values": [0.005, 0.01, 0.02, 0.05]}}
    for m in PIXEL_METHODS},
    "slice": {k: {"levels": [0.0, 50.0, 100.0], "values": [-1e4, 0.0, 1e4]} for k in ("elbo", "kl", "rec")}}


def make_tiny_package(path, seed: int = 0, calibration: dict | None = None):
    torch.manual_seed(seed)
    model = build_model(TINY_ARCH)
    meta = {"name": path.name, "architecture": TINY_ARCH, "input_contract": TINY_CONTRACT,
            "calibration": calibration or {}, "provenance": {"trained_on": "nothing (random weights, tests only)"}}
    return save_package(model, meta, path, card="# tiny test model\n")




TINY_LSR_ARCH = {"type": "vqvae-lsr", "slice_size": 32,
                 "vqvae": {"feature_maps": [4, 8], "residual_blocks": 1, "embedding_dim": 8, "codebook_size": 16},
                 "prior": {"channels": 8, "blocks": 1, "attention_heads": 2, "dropout": 0.0}}
# Thresholds low enough that a random prior flags some codes, so restorations happen.
TINY_LSR_SCORING = {"lambda_s": 2.0, "lambda_p": 3.0, "samples": 3, "temperature": 3.0, "min_pool": 3,
                    "avg_pool": 7, "seed": 0}


def make_tiny_lsr_package(path, seed: int = 0, scoring: dict | None = None):
    torch.manual_seed(seed)
    model = build_model(TINY_LSR_ARCH)
    meta = {"name": path.name, "architecture": TINY_LSR_ARCH, "input_contract": TINY_CONTRACT,
            "lsr": scoring or TINY_LSR_SCORING, "calibration": {},
            "provenance": {"trained_on": "nothing (random weights, tests only)"}}
    return save_package(model, meta, path, card="# tiny LSR test model\n")


def make_tiny_package_reading(path, contrasts, optional=(), seed: int = 0):
    """A tiny calibrated VAE package that reads ``contrasts`` (``optional`` among them)."""
    from anomaly_localizer.core.package import load_package, update_meta
    pkg = make_tiny_package(path, seed=seed, calibration=TINY_CALIBRATION)
    meta = dict(pkg.meta)
    meta["input_contract"] = {**meta["input_contract"], "contrasts": list(contrasts),
                              "optional_contrasts": list(optional)}
    update_meta(pkg.path, meta)
    return load_package(pkg.path)


def phantom_array(shape_zyx=(30, 48, 40), lesion: bool = False, seed: int = 0) -> np.ndarray:
    """A skull-stripped 'brain' in canonical-ish array order (z=axial, y=AP, x=LR).

    Ellipsoid brain: bright white matter core, darker grey-matter shell, dark ventricles;
    optional bright spherical lesion. Zero outside the brain.
    """
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape_zyx], indexing="ij")
    r = (z / 0.8) ** 2 + (y / 0.85) ** 2 + (x / 0.8) ** 2
    img = np.zeros(shape_zyx, np.float32)
    img[r < 1] = 600
    img[r < 0.6] = 900
    vent = ((z / 0.3) ** 2 + (y / 0.4) ** 2 + ((np.abs(x) - 0.15) / 0.1) ** 2) < 1
    img[vent & (r < 1)] = 250
    img[r < 1] += rng.normal(0, 20, size=int((r < 1).sum())).astype(np.float32)
    if lesion:
        les = ((z - 0.2) ** 2 + (y + 0.3) ** 2 + (x - 0.35) ** 2) < 0.2 ** 2
        img[les] = 1600
    return img


def lesion_mask(shape_zyx=(30, 48, 40)) -> np.ndarray:
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape_zyx], indexing="ij")
    return ((z - 0.2) ** 2 + (y + 0.3) ** 2 + (x - 0.35) ** 2) < 0.2 ** 2


def image_from(arr: np.ndarray, spacing=(4.0, 4.0, 4.0), origin=(10.0, -20.0, 5.0), direction=None) -> sitk.Image:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    if direction is not None:
        img.SetDirection(direction)
    return img


def rotation(ax: float, ay: float, az: float) -> tuple[float, ...]:
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return tuple((rz @ ry @ rx).ravel())


def psr_image(arr_zyx: np.ndarray, spacing_zyx=(4.0, 4.0, 4.0)) -> sitk.Image:
    """The same phantom stored with voxel axes P, S, R (like the IXI files).

    Canonical array (z=S, y=P, x=L) -> index axes i=P, j=S, k=R. numpy order is (k, j, i).
    """
    flipped_lr = arr_zyx[:, :, ::-1]  # x now runs towards R
    arr = np.transpose(flipped_lr, (2, 0, 1))  # (R, S, P)
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr))
    img.SetSpacing((spacing_zyx[1], spacing_zyx[0], spacing_zyx[2]))
    img.SetDirection((0, 0, -1, 1, 0, 0, 0, 1, 0))
    img.SetOrigin((88.0, -118.0, -135.0))
    return img


def head_phantom(shape_zyx=(30, 48, 40), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A whole 'head': the brain phantom inside dark CSF, a bright scalp and a dark skull.

    Returns (image, brain mask). Nothing is zero inside the head, so it does not look
    skull-stripped; the background is noisy low intensity, as in a real scan.
    """
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape_zyx], indexing="ij")
    r = (z / 0.95) ** 2 + (y / 0.97) ** 2 + (x / 0.95) ** 2
    brain_r = (z / 0.72) ** 2 + (y / 0.77) ** 2 + (x / 0.72) ** 2
    img = rng.normal(8, 3, size=shape_zyx).astype(np.float32).clip(0)  # air
    img[r < 1] = 700  # scalp and fat: bright on T1
    img[r < 0.85] = 60  # skull: dark
    img[r < 0.72] = 180  # CSF
    inner = phantom_array(shape_zyx, seed=seed)
    brain = brain_r < 0.9
    img[brain] = np.where(inner[brain] > 0, inner[brain], 600)
    img[r < 1] += rng.normal(0, 15, size=int((r < 1).sum())).astype(np.float32)
    return img, brain


TINY_DAE_ARCH = {"type": "unet-dae", "slice_size": 32, "in_channels": 3, "feature_maps": [4, 8], "groups": 2}
TINY_DAE_CONTRACT = {**TINY_CONTRACT, "context_slices": 3}


def make_tiny_dae_package(path, seed: int = 0, calibration: dict | None = None):
    torch.manual_seed(seed)
    model = build_model(TINY_DAE_ARCH)
    meta = {"name": path.name, "architecture": TINY_DAE_ARCH, "input_contract": TINY_DAE_CONTRACT,
            "dae": {"erode_px": 1, "median_px": 3, "slice_top_k": 5}, "recommended_method": "dae",
            "calibration": calibration or {}, "provenance": {"trained_on": "nothing (random weights, tests only)"}}
    return save_package(model, meta, path, card="# tiny DAE test model\n")


TINY_SSL_ARCH = {**TINY_DAE_ARCH, "type": "unet-ssl"}


def make_tiny_ssl_package(path, seed: int = 0, calibration: dict | None = None):
    torch.manual_seed(seed)
    model = build_model(TINY_SSL_ARCH)
    meta = {"name": path.name, "architecture": TINY_SSL_ARCH, "input_contract": TINY_DAE_CONTRACT,
            "ssl": {"flip": True, "slice_top_k": 5}, "recommended_method": "ssl",
            "calibration": calibration or {}, "provenance": {"trained_on": "nothing (random weights, tests only)"}}
    return save_package(model, meta, path, card="# tiny SSL test model\n")


def healthy_folder(root, n=8, shape=(24, 40, 34)):
    """An IXI-style folder of n healthy phantoms (t1/ and brainmask/)."""
    (root / "t1").mkdir(parents=True)
    (root / "brainmask").mkdir()
    for i in range(n):
        arr = phantom_array(shape, seed=i) * (1 + 0.1 * i)
        sitk.WriteImage(image_from(arr), str(root / "t1" / f"S{i:02d}_T1.nii.gz"))
        sitk.WriteImage(image_from((arr != 0).astype(np.uint8)), str(root / "brainmask" / f"S{i:02d}_brainmask.nii.gz"))
    return root


def write_dicom_series(arr: np.ndarray, folder, uid: str = "1.2.826.0.1.3680043.2.1125.1", spacing: float = 4.0):
    """Write an int16 volume (z, y, x) as a DICOM series of axial slices into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(arr.shape[0]):
        s = sitk.GetImageFromArray(arr[k].astype(np.int16))
        s.SetSpacing((spacing, spacing))
        for tag, value in [("0020|000e", uid), ("0020|000d", uid + ".9"), ("0008|0060", "MR"),
                           ("0020|0032", f"0\\0\\{spacing * k}"), ("0020|0037", "1\\0\\0\\0\\1\\0"),
                           ("0020|0013", str(k + 1)), ("0018|0050", str(spacing))]:
            s.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{k:03d}.dcm"))
        writer.Execute(s)
    return folder


# DLMUSE indices: 1 cortical CSF, 51/52 lateral ventricles, 100 a cortical region (grey), 81 white matter
CSF, VENT, GREY, WHITE = 1, 51, 100, 81


def parcellation(shape=(40, 48, 44)):
    """A DLMUSE-like parcellation of an ellipsoid brain: cortical CSF, grey, white, two ventricles."""
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    r = np.sqrt((z / 0.9) ** 2 + (y / 0.95) ** 2 + (x / 0.9) ** 2)
    labels = np.zeros(shape, np.int32)
    labels[r < 1] = CSF
    labels[r < 0.93] = GREY
    labels[r < 0.75] = WHITE
    labels[((z / 0.25) ** 2 + (y / 0.35) ** 2 + ((np.abs(x) - 0.15) / 0.1) ** 2) < 1] = VENT
    return labels


def t1_of(labels, seed=0, texture=20.0):
    """A T1 of a :func:`parcellation`: CSF < grey < white, Gaussian texture."""
    rng = np.random.default_rng(seed)
    values = {0: 0, CSF: 300, VENT: 280, GREY: 650, WHITE: 1000}
    arr = np.vectorize(values.get)(labels).astype(np.float32)
    return np.where(labels > 0, arr + rng.normal(0, texture, labels.shape), 0).astype(np.float32)


def parcellated_folder(root, n=6, shape=(40, 48, 44)):
    """An IXI-style folder of n parcellated phantom T1s (t1/, dlmuse/, brainmask/), 4 mm voxels."""
    for sub in ("t1", "dlmuse", "brainmask"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    ids = [f"S{i:02d}" for i in range(n)]
    for i, sid in enumerate(ids):
        labels = parcellation(shape)
        for arr, path in ((t1_of(labels, i), root / "t1" / f"{sid}_T1.nii.gz"),
                          (labels.astype(np.uint8), root / "dlmuse" / f"{sid}_T1_DLMUSE.nii.gz"),
                          ((labels > 0).astype(np.uint8), root / "brainmask" / f"{sid}_brainmask.nii.gz")):
            img = sitk.GetImageFromArray(arr)
            img.SetSpacing((4.0, 4.0, 4.0))
            sitk.WriteImage(img, str(path))
    return ids
