"""Folders of healthy scans for training and calibration, and the slice cache.

Accepted layouts of a DATA folder (see README, "Training"):

- IXI style (as ``../shared/data/ixi_t1_2mm``): ``t1/<subject>_T1.nii.gz`` with
  ``brainmask/<subject>_brainmask.nii.gz``;
- flat: images in DATA with an optional mask beside each, named ``<stem>_brainmask.<ext>``
  or ``<stem>_mask.<ext>``; images without a mask must be skull-stripped.

Volumes become model slices once (:func:`load_slices`) and are cached as a plain ``.npz``
(no pickle), keyed by the input contract and the files' sizes and dates.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.imageio import as_3d, read_image
from ..core.volume import NORMALISATION, brain_mask, prepare_volume
from ..errors import InputError
from .rendering import rendered_contrast, rendered_from, source_subject

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
CACHE_VERSION = 2  # 2: slice positions stored
# Slices whose model-space brain covers less than this share of the slice are left out of
# training (the tips of the brain teach little); scoring still scores them.
MIN_BRAIN_FRACTION = 0.01


@dataclass(frozen=True)
class Subject:
    id: str
    image: Path
    mask: Path | None
    # a rendering's contrast and the subject's other scans on the same grid (the T1 it was
    # rendered from): together a co-registered study (:func:`read_study`)
    contrast: str | None = None
    others: tuple[tuple[str, Path], ...] = ()


def read_study(subject: Subject, image):
    """``{contrast: image}`` of a subject that is a study (a rendering and the T1 it was
    rendered from; ``image`` the subject's own, perhaps changed), else None."""
    if subject.contrast is None or not subject.others:
        return None
    return {subject.contrast: image, **{c: as_3d(read_image(p)) for c, p in subject.others}}


def _stem(p: Path) -> str:
    name = p.name
    for suf in IMAGE_SUFFIXES:
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return p.stem


def find_subjects(data: str | Path) -> list[Subject]:
    """Subjects in a DATA folder, sorted by id."""
    data = Path(data)
    if not data.is_dir():
        raise InputError(f"data folder {data} does not exist; give a folder of healthy scans")
    subjects: list[Subject] = []
    if (data / "t1").is_dir():
        for img in sorted((data / "t1").iterdir()):
            if not img.name.lower().endswith(IMAGE_SUFFIXES):
                continue
            sid = re.sub(r"_T1$", "", _stem(img))
            masks = [m for m in (data / "brainmask").glob(f"{sid}_brainmask.*")] if (data / "brainmask").is_dir() else []
            subjects.append(Subject(sid, img, masks[0] if masks else None))
    else:
        files = [f for f in sorted(data.iterdir()) if f.is_file() and f.name.lower().endswith(IMAGE_SUFFIXES)]
        mask_like = re.compile(r"_(brain)?mask$")
        by_stem: dict[str, Path] = {}
        for f in files:
            by_stem.setdefault(_stem(f), f)
        for img in files:
            stem = _stem(img)
            if mask_like.search(stem):
                continue
            masks = [by_stem[n] for n in (f"{stem}_brainmask", f"{stem}_mask") if n in by_stem]
            contrast = rendered_contrast(stem)
            source_t1 = rendered_from(data, stem) if contrast else None
            subjects.append(Subject(stem, img, masks[0] if masks else None, contrast,
                                    (("t1", source_t1),) if source_t1 else ()))
    if not subjects:
        raise InputError(f"no images found in {data}; expected t1/ and brainmask/ folders or image files")
    return subjects


def split_subjects(ids: list[str], seed: int, val_fraction: float, calibration_fraction: float,
                   test_fraction: float) -> dict[str, list[str]]:
    """Split by subject, never by slice, into four disjoint sets.

    train: fits the weights; val: learning-rate schedule and early stopping; calibration:
    healthy subjects that set the thresholds; test: healthy subjects held back from
    everything, on which the thresholds' false-positive rates are checked and synthetic
    anomalies are evaluated.

    Renderings of one subject in other contrasts (``<subject>~<contrast>~<k>``,
    :mod:`.rendering`) stay together on one side: the split is drawn over subjects, and a
    subject's split is the same as in the T1 folder it was rendered from.
    """
    groups: dict[str, list[str]] = {}
    for i in ids:
        groups.setdefault(source_subject(i), []).append(i)
    order = sorted(groups)
    random.Random(seed).shuffle(order)
    n = len(order)
    sizes = [max(1, round(f * n)) if n >= 4 else 0 for f in (test_fraction, calibration_fraction, val_fraction)]
    a, b, c = sizes[0], sizes[0] + sizes[1], sum(sizes)

    def members(part: list[str]) -> list[str]:
        return sorted(i for g in part for i in groups[g])
    return {"test": members(order[:a]), "calibration": members(order[a:b]), "val": members(order[b:c]),
            "train": members(order[c:])}


@dataclass
class SliceSet:
    """Model slices of several subjects: x (N,C,S,S) float32 (C = the contract's context
    slices, the slice itself in the middle), mask (N,1,S,S) bool of the middle slice."""

    x: torch.Tensor
    mask: torch.Tensor
    subject: np.ndarray  # (N,) index into ``subject_ids``
    subject_ids: list[str]
    position: torch.Tensor | None = None  # (N,) relative position in the brain, 0 lowest .. 1 highest

    def __len__(self) -> int:
        return int(self.x.shape[0])


def _cache_key(subjects: list[Subject], contract: dict[str, Any]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"v": CACHE_VERSION, "contract": contract, "norm": NORMALISATION,
                         "min_brain": MIN_BRAIN_FRACTION}, sort_keys=True).encode())
    for s in subjects:
        for p in (s.image, s.mask):
            if p is not None:
                st = p.stat()
                h.update(f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:24]


def load_volume_slices(subject: Subject, contract: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Model slices, their brain masks and their relative positions in the brain."""
    image = as_3d(read_image(subject.image))
    mask = as_3d(read_image(subject.mask, "MASK")) if subject.mask else None
    prepared = prepare_volume(image, brain_mask(image, mask), contract)
    # 2.5D models see each slice with its neighbours as channels (the contract says how many).
    context = int(contract.get("context_slices", 1)) if isinstance(contract, dict) else contract.context_slices
    x = prepared.with_context(context).numpy()
    m = prepared.mask.numpy()
    pos = prepared.slice_positions().numpy()
    keep = m.reshape(len(m), -1).mean(1) >= MIN_BRAIN_FRACTION
    return x[keep], m[keep], pos[keep]


def load_slices(subjects: list[Subject], contract: dict[str, Any], cache_dir: Path | None = None) -> SliceSet:
    """Model slices of all subjects, from the cache when it holds them."""
    cache = None
    if cache_dir is not None:
        cache = Path(cache_dir) / f"slices-{_cache_key(subjects, contract)}.npz"
        if cache.is_file():
            with np.load(cache, allow_pickle=False) as z:
                return SliceSet(torch.from_numpy(z["x"]), torch.from_numpy(z["mask"]), z["subject"],
                                [str(s) for s in z["ids"]], torch.from_numpy(z["position"]))
    xs, ms, ps, subj = [], [], [], []
    for i, s in enumerate(subjects):
        x, m, p = load_volume_slices(s, contract)
        xs.append(x)
        ms.append(m)
        ps.append(p)
        subj.append(np.full(len(x), i, np.int32))
    x = np.concatenate(xs).astype(np.float32)
    m = np.concatenate(ms).astype(bool)
    pos = np.concatenate(ps).astype(np.float32)
    subject = np.concatenate(subj)
    ids = [s.id for s in subjects]
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        # A file of our own per process: under torchrun every rank may build the cache at
        # once, and each then atomically replaces it with the same content.
        tmp = cache.with_name(f"{cache.stem}.{os.getpid()}.tmp.npz")
        np.savez(tmp, x=x, mask=m, subject=subject, ids=np.array(ids), position=pos)
        tmp.replace(cache)
    return SliceSet(torch.from_numpy(x), torch.from_numpy(m), subject, ids, torch.from_numpy(pos))


def check_run_folder(out: Path, resume: bool, force: bool, checkpoint: Path) -> None:
    """A training's output folder: refuse to touch a used one unless resuming or forced, and a
    resume without ``checkpoint`` (a file or folder that an interrupted run leaves)."""
    if out.exists() and any(out.iterdir()) and not (resume or force):
        raise InputError(f"{out} already exists; pass --resume to continue its training or --force to start over")
    if resume and not checkpoint.exists():
        raise InputError(f"nothing to resume in {out} (no checkpoint); start without --resume")


def split_slices(data: str | Path, cfg: Any, cache: Path) -> tuple[dict[str, list[str]], dict[str, Subject], SliceSet,
                                                                   SliceSet]:
    """The subject split every model family uses (``cfg``: seed and fractions) and the model
    slices (``cfg.contract``) of its training and validation subjects: (split, subjects by
    id, training slices, validation slices)."""
    subjects = find_subjects(data)
    split = split_subjects([s.id for s in subjects], cfg.seed, cfg.val_fraction, cfg.calibration_fraction,
                           cfg.test_fraction)
    by_id = {s.id: s for s in subjects}
    train_set = load_slices([by_id[i] for i in split["train"]], cfg.contract, cache)
    val_set = load_slices([by_id[i] for i in split["val"]], cfg.contract, cache) if split["val"] else train_set
    return split, by_id, train_set, val_set
