"""Training the brain extraction U-Net and measuring it (Dice against reference masks,
optionally with seeded tumour-like lesions); the extraction itself is
:mod:`anomaly_localizer.core.brainextract`."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from ...core.brainextract import (
    DEFAULT_ARCH,
    DEFAULT_SPACING,
    contract,
    extract_brain,
    head_mask,
)
from ...core.imageio import as_3d, read_image
from ...core.package import ModelPackage, build_network, save_package
from ...core.volume import prepare_volume, resample_to_model
from ...errors import InputError
from ..data import Subject, find_subjects, split_subjects
from ..metrics import dice_at
from .steps import LoopPlan, load_best, run_steps, start_run, training_record


def _subject_slices(s: Subject, ctr: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    image = as_3d(read_image(s.image))
    brain = sitk.GetArrayFromImage(as_3d(read_image(s.mask, "MASK"))) > 0
    head = head_mask(image) | brain
    prepared = prepare_volume(image, head, ctr)
    canon_brain = prepared.layout.to_canonical(brain).astype(np.float32)
    target = resample_to_model(canon_brain, prepared.layout, prepared.centre, prepared.slice_size,
                               prepared.model_spacing, prepared.slice_index) > 0.5
    return prepared.slices.numpy(), target.numpy()


def _loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    bce = F.binary_cross_entropy_with_logits(logits, target)
    p = torch.sigmoid(logits)
    dice = 1 - (2 * (p * target).sum() + 1) / (p.sum() + target.sum() + 1)
    return bce + dice


@dataclass
class BrainmaskConfig:
    """What a brain extraction training was asked (checked on resume, recorded in the package)."""

    epochs: int
    seed: int
    batch_size: int
    learning_rate: float
    spacing_mm: float
    slice_step: int
    architecture: dict[str, Any]


def train_brainmask(data: str | Path, out: str | Path, epochs: int = 12, seed: int = 0, batch_size: int = 32,
                    learning_rate: float = 1e-3, arch: dict | None = None, spacing: float = DEFAULT_SPACING,
                    progress: Callable[[str], None] | None = print, force: bool = False,
                    slice_step: int = 2) -> ModelPackage:
    """Train the brain extraction U-Net on scans with reference masks, split as the anomaly models,
    through the training loop (:mod:`.steps`): Adam with a cosine schedule by epoch, the
    weights of the epoch with the lowest validation loss (the validation subjects' slices)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise InputError(f"{out} already exists; pass --force to replace it")
    arch = {**DEFAULT_ARCH, **(arch or {})}
    subjects = [s for s in find_subjects(data) if s.mask is not None]
    if len(subjects) < 4:
        raise InputError(f"brain extraction needs scans with reference brain masks; {data} has {len(subjects)}")
    split = split_subjects([s.id for s in subjects], seed, 0.1, 0.15, 0.15)
    by_id = {s.id: s for s in subjects}
    ctr = contract(int(arch["slice_size"]), spacing)

    def slices_of(ids: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = zip(*[_subject_slices(by_id[i], ctr) for i in ids])
        # every other axial slice: neighbours are nearly identical, and this halves the cost
        return (torch.from_numpy(np.concatenate([a[::slice_step] for a in xs])),
                torch.from_numpy(np.concatenate([a[::slice_step] for a in ys])).float())

    x, y = slices_of(split["train"])
    val_x, val_y = slices_of(split["val"]) if split["val"] else (x[:256], y[:256])
    if progress:
        progress(f"{len(split['train'])} training subjects, {len(x)} slices; {len(val_x)} validation slices")
    cfg = BrainmaskConfig(epochs, seed, batch_size, learning_rate, spacing, slice_step, arch)
    torch.manual_seed(seed)
    model = build_network(arch)
    say = progress or (lambda m: None)
    run = start_run(model, cfg, out, False, say, torch.optim.Adam(model.parameters(), lr=learning_rate))
    batches = len(x) // batch_size
    # cosine annealing by epoch, as CosineAnnealingLR over the epochs
    plan = LoopPlan.epochs(epochs, batches, seed, learning_rate=lambda step: learning_rate * 0.5 * (
        1 + math.cos(math.pi * (step // max(batches, 1)) / epochs)))
    draws: dict[str, Any] = {}

    def batch_loss(step: int, _: torch.Generator) -> torch.Tensor:
        epoch, b = divmod(step, max(batches, 1))
        if draws.get("epoch") != epoch:
            gen = torch.Generator().manual_seed(seed * 100003 + epoch + 1)
            draws.update(epoch=epoch, gen=gen, order=torch.randperm(len(x), generator=gen))
        gen, idx = draws["gen"], draws["order"][b * batch_size:(b + 1) * batch_size]
        xb, yb = x[idx], y[idx]
        flip = torch.rand(len(idx), generator=gen) < 0.5  # left-right flips
        xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
        yb = torch.where(flip[:, None, None, None], yb.flip(-1), yb)
        xb = xb * (1 + 0.2 * (torch.rand(len(idx), 1, 1, 1, generator=gen) - 0.5))  # contrast
        return _loss(model(xb), yb)

    def validate() -> tuple[float, dict[str, float]]:
        losses = [float(_loss(model(val_x[s:s + 64]), val_y[s:s + 64])) * len(val_x[s:s + 64])
                  for s in range(0, len(val_x), 64)]
        return sum(losses) / max(len(val_x), 1), {}

    run_steps(run, plan, batch_loss, validate, say)
    model = load_best(run)
    history = training_record(run, plan)
    meta = {"name": out.name, "summary": f"Brain extraction U-Net, {arch['slice_size']}x{arch['slice_size']} axial "
                                         f"slices at {spacing:g} mm, trained on {len(split['train'])} subjects",
            "architecture": arch, "input_contract": ctr, "calibration": {},
            "provenance": {"data": str(data), "subjects": split, "trained": time.strftime("%Y-%m-%d"),
                           "torch": torch.__version__},
            "training": {"config": {"epochs": epochs, "seed": seed, "batch_size": batch_size, "slice_step": slice_step,
                                    "learning_rate": learning_rate, "spacing_mm": spacing, "architecture": arch},
                         **history}}
    return save_package(model, meta, out)


# Tumour-like lesions for the robustness check: large balls (15-30 mm radius) of raised,
# lowered or uniform intensity inside the brain. A brain extraction that leaves such a
# lesion outside its mask hides it from every anomaly score.
LESION_KINDS = ("shift_up", "shift_down", "uniform")
LESION_RADIUS_MM = (15.0, 30.0)


def _with_lesion(image: sitk.Image, brain: np.ndarray, seed: int) -> tuple[sitk.Image, np.ndarray, str]:
    """``image`` with one seeded tumour-like lesion inside ``brain``: (image, label, kind)."""
    from ..evaluation.synthetic import insert_anomaly
    rng = np.random.default_rng(seed)
    kind = LESION_KINDS[int(rng.integers(len(LESION_KINDS)))]
    arr = sitk.GetArrayFromImage(image).astype(np.float32)
    out, label = insert_anomaly(arr, brain, image.GetSpacing()[::-1], kind, rng, radius_mm=LESION_RADIUS_MM)
    lesioned = sitk.GetImageFromArray(out)
    lesioned.CopyInformation(image)
    return lesioned, label.astype(bool), kind


def dice_on_subjects(package: ModelPackage, subjects: list[Subject], device: str = "cpu",
                     progress: Callable[[str], None] | None = None, engine_rule: bool = False,
                     lesion_seed: int | None = None) -> dict[str, dict[str, Any]]:
    """Per subject, the Dice of the extracted brain against the reference mask. With
    ``engine_rule``, of the mask the engine itself would use given the image alone: the
    non-background region of a skull-stripped scan, the extraction of a whole head.

    With ``lesion_seed``, each scan first gets one seeded tumour-like lesion in its brain
    (:data:`LESION_KINDS`, radius :data:`LESION_RADIUS_MM`); the record then also holds the
    lesion's kind, its voxels and the share of them inside the extracted mask
    (``lesion_kept``: what the anomaly scores can still see). The reference mask is unchanged:
    a lesion in the brain is brain."""
    from ...core.volume import brain_mask
    model = package.load_model(device)
    out: dict[str, dict[str, Any]] = {}
    for i, s in enumerate(subjects):
        image = as_3d(read_image(s.image))
        ref = sitk.GetArrayFromImage(as_3d(read_image(s.mask, "MASK"))) > 0
        record: dict[str, Any] = {}
        if lesion_seed is not None:
            image, lesion, kind = _with_lesion(image, ref, lesion_seed * 1000003 + i)
            record.update(kind=kind, lesion_voxels=int(lesion.sum()))
        if engine_rule:
            mask = brain_mask(image, None, lambda img: extract_brain(img, package, device, model))
        else:
            mask = extract_brain(image, package, device, model)
        record["dice"] = dice_at(mask.ravel().astype(np.float32), ref.ravel(), 0.5)
        if lesion_seed is not None:
            record["lesion_kept"] = float(mask[lesion].mean()) if lesion.any() else None
        out[s.id] = record
        if progress:
            extra = (f", {record['kind']} lesion of {record['lesion_voxels']} voxels, "
                     f"{100 * (record['lesion_kept'] or 0):.1f} % inside the mask") if lesion_seed is not None else ""
            progress(f"{s.id}: Dice {record['dice']:.4f}{extra}")
    return out
