"""Built-in brain extraction: a whole-head T1 becomes a brain mask without a user-made one.

A small 2D U-Net (:class:`models.unet.UNet2D`) labels the brain on axial slices. Slices
come from the same pipeline as the anomaly models (:func:`volume.prepare_volume`), with the
head (not the brain) as the region that is normalised and centred; the probabilities are
mapped back onto the input's grid, thresholded at 0.5, reduced to the largest connected
component and hole-filled.

Trained by ``anomaly-localizer train-brainmask`` (:mod:`anomaly_localizer.tooling.training.brainmask`)
on scans with reference brain masks, split by subject like the anomaly models.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from ..errors import AnomalyLocalizerError, InputError
from .package import BRAIN_EXTRACTION_TYPES, ModelPackage, load_package
from .package import list_packages, model_dirs
from .regions import bounding_box
from .volume import NORMALISATION, prepare_volume

log = logging.getLogger(__name__)

DEFAULT_ARCH = {"type": "unet-brainmask", "slice_size": 128, "feature_maps": [8, 16, 32, 64]}
DEFAULT_SPACING = 2.0  # 128 x 2 mm = 256 mm: a whole head fits


HEAD_MASK_MM = 2.0  # the head is found on voxels of about this size (it needs no finer detail)


def head_mask(image: sitk.Image) -> np.ndarray:
    """The head (everything that is not background air), holes filled, on the image's grid.

    A low threshold (5 % of the 99th intensity percentile) keeps the dark skull and CSF,
    which an Otsu threshold would drop, cutting the scalp off from the brain. On a grid finer
    than :data:`HEAD_MASK_MM` it is found on blocks of voxels averaged to about that size and
    brought back by nearest neighbour: the same mask for a 2 mm scan, a sixth of the cost on
    a 1 mm one (connected components, closing and hole filling on 12 million voxels took 3 s).
    """
    factors = [max(1, int(round(HEAD_MASK_MM / s))) for s in image.GetSpacing()[:3]]
    if all(f == 1 for f in factors):
        return _head_mask(image)
    small = sitk.BinShrink(sitk.Cast(image, sitk.sitkFloat32), factors)
    found = sitk.GetImageFromArray(_head_mask(small).astype(np.uint8))
    found.CopyInformation(small)
    back = sitk.Resample(found, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return sitk.GetArrayFromImage(back) > 0


def _head_mask(image: sitk.Image) -> np.ndarray:
    arr = sitk.GetArrayViewFromImage(image)
    level = 0.05 * float(np.percentile(arr, 99))
    fg = sitk.GetImageFromArray((arr > level).astype(np.uint8))
    cc = sitk.RelabelComponent(sitk.ConnectedComponent(fg), sortByObjectSize=True)
    largest = sitk.BinaryThreshold(cc, 1, 1, 1, 0)
    closed = sitk.BinaryMorphologicalClosing(largest, [2, 2, 2])
    head = sitk.GetArrayFromImage(sitk.BinaryFillhole(closed)) > 0
    if not head.any():
        raise InputError("no head found in the image (all background); check the image")
    return head


def contract(slice_size: int = 128, spacing: float = DEFAULT_SPACING) -> dict[str, Any]:
    return {"modality": "T1w", "orientation": "axial", "slice_size": slice_size, "spacing_mm": spacing,
            "normalisation": {**NORMALISATION, "region": "head"}}


def postprocess(prob: np.ndarray) -> np.ndarray:
    """Threshold at 0.5, keep the largest connected component, fill holes: bool mask.

    Done on the thresholded region's bounding box grown by one voxel (within the grid): the
    components and the holes are the same as on the whole grid (the border is background that
    touches all background outside the box), and a whole-head 1 mm grid costs a fifth."""
    above = prob > 0.5
    if not above.any():
        raise InputError("brain extraction found no brain; pass a brain mask with --mask")
    box = bounding_box(above, margin=1)
    binary = sitk.GetImageFromArray(above[box].astype(np.uint8))
    cc = sitk.RelabelComponent(sitk.ConnectedComponent(binary), sortByObjectSize=True)
    largest = sitk.BinaryThreshold(cc, 1, 1, 1, 0)
    out = np.zeros(prob.shape, bool)
    out[box] = sitk.GetArrayFromImage(sitk.BinaryFillhole(largest)) > 0
    return out


def extract_brain(image: sitk.Image, package: ModelPackage, device: str = "cpu", model=None) -> np.ndarray:
    """Brain mask (bool, the input's array order) of a whole-head scan."""
    head = head_mask(image)
    prepared = prepare_volume(image, head, package.contract, model_slices=True)
    net = model if model is not None else package.load_model(device)
    probs = []
    with torch.no_grad():
        for s in range(0, prepared.slices.shape[0], 32):
            probs.append(torch.sigmoid(net(prepared.slices[s:s + 32].to(device)))[:, 0].cpu())
    prob = prepared.to_input_grid(torch.cat(probs))
    return postprocess(prob)


def check_brain_extraction(choice: str | None) -> ModelPackage | None:
    """The brain extraction model a ``--brain-extraction`` value names (None for auto and
    off), refused in one line when it is empty or not a brain extraction model."""
    from .package import resolve_package
    if choice in (None, "auto", "off"):
        return None
    if not str(choice).strip():
        raise InputError("--brain-extraction is empty; give auto, off or a brain extraction model's name or folder")
    package = resolve_package(choice)
    if package.arch_type not in BRAIN_EXTRACTION_TYPES:
        raise InputError(f"--brain-extraction {choice}: model {package.name} is an anomaly model ({package.arch_type}), "
                         "not a brain extraction model; give auto, off or a brain extraction model (e.g. "
                         "brain-extraction-unet)")
    return package


def default_extractor() -> ModelPackage | None:
    """The installed brain extraction model named in a models index, else the first found.
    A broken package of that name earlier in the model folders is said (a warning), not
    skipped without a word."""
    from .package import all_package_paths
    for d in model_dirs():
        index = d / "index.json"
        if index.is_file():
            try:
                name = json.loads(index.read_text()).get("brain_extraction")
            except (ValueError, AttributeError, RecursionError, OSError):
                continue
            if name and (d / name).is_dir():
                for earlier in [p for p in all_package_paths() if p.name == name]:
                    if earlier.resolve() == (d / name).resolve():
                        break
                    try:
                        load_package(earlier)
                    except AnomalyLocalizerError as exc:
                        log.warning("the brain extraction model %s is broken and not used (%s); %s is used instead: "
                                    "fix or remove it", earlier, str(exc).splitlines()[0][:160], d / name)
                return load_package(d / name)
    for path in list_packages():
        try:
            p = load_package(path)
        except AnomalyLocalizerError:  # a broken package elsewhere must not block scoring
            continue
        if p.architecture.get("type") in BRAIN_EXTRACTION_TYPES:
            return p
    return None
