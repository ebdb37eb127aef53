"""``anomaly-localizer train-tissue``: the contrast-agnostic tissue segmenter of the
anatomy-conditioned score (:mod:`anomaly_localizer.core.detectors.anatomy`).

No healthy FLAIR, T2 or T1c scan is reachable, but healthy T1 scans with a DLMUSE
parcellation are. The segmenter learns the tissue classes (CSF, cortical grey matter, white
matter, deep grey matter, periventricular white matter: :func:`tissue_classes`) from:
- the real T1s and their renderings in other contrasts (:mod:`..rendering`, ``render``),
  which share the T1's grid and so its labels;
- on the fly, domain randomisation as in SynthSeg (Billot et al. 2023): each slice's
  intensities go through a random smooth lookup table (any tissue order, the T1's texture
  kept), with random contrast, gamma, bias field, noise and left-right flips;
- blobs of random shape and intensity pasted into the brain with the tissue beneath kept as
  the label (:func:`paste_blobs`): the network must label a lesion as the tissue it sits in,
  so the score compares the lesion with that tissue. These blobs are this training's own
  generator; no evaluation uses it (evaluation seeds anomalies with
  :mod:`..evaluation.synthetic`).

Loss: cross-entropy plus soft Dice over brain pixels. The validation figure that picks the best
weights is the mean Dice of the classes over the validation subjects' slices in every
contrast (no randomisation). The step loop is :mod:`.steps`'s.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from ...core.detectors.anatomy import DEFAULT_ANATOMY_SCORING, TISSUE_CLASSES, AnatomyArchitecture
from ...errors import InputError
from .loop import place
from .steps import SliceContract, load_config, run_steps, start_run, write_trained_package

# DLMUSE single regions (../shared/data/ixi_t1_2mm/dlmuse/MUSE_listROIs.csv) by class.
CSF_REGIONS = (1, 4, 11, 49, 50, 51, 52)
LATERAL_VENTRICLES = (49, 50, 51, 52)
WHITE_REGIONS = (35, 40, 41, 61, 62, 81, 82, 83, 84, 85, 86, 87, 88, 89, 90, 91, 92, 93, 94, 95)  # and brainstem
DEEP_GREY_REGIONS = (23, 30, 36, 37, 55, 56, 57, 58, 59, 60, 75, 76)
PERIVENTRICULAR_MM = 4.0  # white matter this close to a lateral ventricle is its own class (bright on FLAIR)
VALIDATION_SLICES = 512


def tissue_classes(labels: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """DLMUSE labels (array order, ``spacing`` in that order) -> uint8 classes: 0 outside the
    brain, then 1 + the index in :data:`TISSUE_CLASSES`. Every other region inside the brain
    (cortex, cerebellar cortex, hippocampus, amygdala) is cortical grey matter."""
    import SimpleITK as sitk
    out = np.zeros(labels.shape, np.uint8)
    brain = labels > 0
    out[brain] = 2
    out[np.isin(labels, CSF_REGIONS)] = 1
    white = np.isin(labels, WHITE_REGIONS)
    out[white] = 3
    out[np.isin(labels, DEEP_GREY_REGIONS)] = 4
    vent = sitk.GetImageFromArray(np.isin(labels, LATERAL_VENTRICLES).astype(np.uint8))
    vent.SetSpacing(tuple(float(s) for s in spacing[::-1]))
    dist = sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(vent, insideIsPositive=False, squaredDistance=False,
                                                               useImageSpacing=True))
    out[white & (dist <= PERIVENTRICULAR_MM)] = 5
    return out


@dataclass
class TissueSet:
    """Model slices x (N,C,S,S) and their classes y (N,S,S) int64 (-1 outside the brain)."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.x)


@dataclass
class TissueTrainConfig(SliceContract):
    architecture: dict[str, Any] = field(default_factory=lambda: AnatomyArchitecture().model_dump(exclude={"type"}))
    learning_rate: float = 1e-3
    steps: int = 6000
    validate_every: int = 250
    randomise: float = 0.6  # share of slices whose intensities go through a random lookup table
    blobs: float = 0.5  # share of slices with pasted blobs
    noise: float = 0.03  # Gaussian noise, normalised intensity
    scoring: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_ANATOMY_SCORING))

    @classmethod
    def from_json(cls, path: str | Path | None, **overrides: Any) -> "TissueTrainConfig":
        return load_config(cls, path, AnatomyArchitecture, DEFAULT_ANATOMY_SCORING, **overrides)


def _subject_slices(t1: Path, labels_path: Path, images: list[Path], contract: dict[str, Any]
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Model slices of the T1 and of each image on its grid, and their classes (repeated)."""
    import SimpleITK as sitk

    from ...core.imageio import as_3d, read_image
    from ...core.volume import prepare_volume, resample_to_model
    t1_img = as_3d(read_image(t1))
    lab_img = sitk.ReadImage(str(labels_path))
    labels = sitk.GetArrayFromImage(lab_img).astype(np.int32)
    classes = tissue_classes(labels, t1_img.GetSpacing()[::-1])
    brain = labels > 0
    xs, prepared = [], None
    for path in [t1, *images]:
        img = t1_img if path == t1 else as_3d(read_image(path))
        if img.GetSize() != t1_img.GetSize() or not np.allclose(img.GetSpacing(), t1_img.GetSpacing()) \
                or not np.allclose(img.GetOrigin(), t1_img.GetOrigin()) \
                or not np.allclose(img.GetDirection(), t1_img.GetDirection()):
            raise InputError(f"{path} is not on the grid of {t1}")
        prepared = prepare_volume(img, brain, contract, model_slices=True)  # as scoring prepares it
        xs.append(prepared.with_context(int(contract["context_slices"])).numpy())
    p = prepared
    onehot = [resample_to_model(p.layout.to_canonical(classes == c).astype(np.float32), p.layout, p.centre,
                                p.slices.shape[-1], p.model_spacing, p.slice_index)[:, 0]
              for c in range(1, len(TISSUE_CLASSES) + 1)]
    y = torch.stack(onehot, 1).argmax(1)
    y[~p.mask[:, 0]] = -1
    return np.concatenate(xs), np.tile(y.numpy().astype(np.int8), (len(xs), 1, 1))


def load_tissue_set(sources: list[Any], renders: dict[str, list[Path]], contract: dict[str, Any],
                    cache: Path | None, say: Callable[[str], None]) -> TissueSet:
    """Slices and classes of ``sources`` (:class:`..rendering.Source`) and their renderings,
    cached as a plain .npz under ``cache`` (keyed by the files and the contract)."""
    import hashlib
    import json
    def stamp(p: Path) -> list:  # a changed file makes another cache
        st = p.stat()
        return [str(p), st.st_size, st.st_mtime_ns]
    key = hashlib.sha256(json.dumps([[stamp(s.t1), stamp(s.labels), [stamp(p) for p in renders.get(s.id, [])]]
                                     for s in sources] + [contract], sort_keys=True).encode()).hexdigest()[:16]
    path = cache / f"tissue-{key}.npz" if cache else None
    if path is not None and path.is_file():
        with np.load(path, allow_pickle=False) as z:
            return TissueSet(torch.from_numpy(z["x"]), torch.from_numpy(z["y"]).long())
    xs, ys, t0 = [], [], time.perf_counter()
    for i, s in enumerate(sources):
        x, y = _subject_slices(s.t1, s.labels, renders.get(s.id, []), contract)
        xs.append(x)
        ys.append(y)
        if (i + 1) % 10 == 0:
            say(f"loaded {i + 1}/{len(sources)} subjects ({time.perf_counter() - t0:.0f} s)")
    x, y = np.concatenate(xs).astype(np.float32), np.concatenate(ys)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.stem + ".tmp.npz")
        np.savez(tmp, x=x, y=y)
        tmp.replace(path)
    return TissueSet(torch.from_numpy(x), torch.from_numpy(y).long())


def random_lookup(x: torch.Tensor, brain: torch.Tensor, gen: torch.Generator, knots: int = 7) -> torch.Tensor:
    """Each slice's brain intensities through its own random smooth lookup table (piecewise
    linear over ``knots`` points spanning the normalised range), renormalised to the brain's
    median 0.5 and IQR 0.25 as the engine normalises every scan."""
    n = x.shape[0]
    values = torch.rand(n, knots, generator=gen) * 1.5
    pos = ((x.clamp(-0.25, 1.5) + 0.25) / 1.75 * (knots - 1))
    lo = pos.floor().clamp(0, knots - 2).long()
    frac = pos - lo
    flat = values[:, None, None, None, :].expand(*x.shape, knots)
    v0 = torch.gather(flat, -1, lo[..., None])[..., 0]
    v1 = torch.gather(flat, -1, (lo + 1)[..., None])[..., 0]
    y = v0 + (v1 - v0) * frac
    out = torch.empty_like(x)
    for i in range(n):
        inside = y[i][brain[i]]
        if inside.numel() < 20:
            out[i] = x[i]
            continue
        q = torch.quantile(inside, torch.tensor([0.25, 0.5, 0.75]))
        out[i] = torch.where(brain[i], (y[i] - q[1]) / (q[2] - q[0]).clamp_min(1e-3) * 0.25 + 0.5, x[i])
    return out


def paste_blobs(x: torch.Tensor, brain: torch.Tensor, gen: torch.Generator, most: int = 3) -> torch.Tensor:
    """Up to ``most`` blobs per slice (random ellipses 2-14 pixels across, warped by smooth
    noise, soft-edged) of random intensity (normalised -0.2 to 1.8), inside the brain."""
    n, c, s, _ = x.shape
    u = lambda *shape: torch.rand(*shape, generator=gen)  # noqa: E731
    yy, xx = torch.meshgrid(torch.arange(s, dtype=torch.float32), torch.arange(s, dtype=torch.float32), indexing="ij")
    out = x.clone()
    for i in range(n):
        inside = brain[i, 0].nonzero()
        if len(inside) < 50:
            continue
        for _ in range(int(u(1) * most) + 1):
            cy, cx = inside[int(u(1) * len(inside))].float()
            ry, rx = 1 + u(2) * 6
            angle = u(1) * np.pi
            dy, dx = yy - cy, xx - cx
            a, b = dy * torch.cos(angle) + dx * torch.sin(angle), -dy * torch.sin(angle) + dx * torch.cos(angle)
            warp = F.interpolate(u(1, 1, 4, 4) * 2 - 1, size=(s, s), mode="bicubic", align_corners=False)[0, 0]
            r = torch.sqrt((a / ry) ** 2 + (b / rx) ** 2) + 0.4 * warp
            weight = torch.sigmoid((1 - r) * 4) * brain[i, 0]
            level = -0.2 + 2.0 * u(1)
            texture = 1 + 0.1 * (u(s, s) - 0.5)
            out[i] = out[i] * (1 - weight) + weight * level * texture
    return out


def augment(x: torch.Tensor, y: torch.Tensor, cfg: TissueTrainConfig, gen: torch.Generator
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """The training's randomisation of a batch (module docstring); labels follow the flips."""
    from .train_dae import augment as intensity_augment
    n = x.shape[0]
    flip = (torch.rand(n, generator=gen) < 0.5)
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    y = torch.where(flip[:, None, None], y.flip(-1), y)
    brain = (y >= 0)[:, None].expand_as(x)
    pick = torch.rand(n, generator=gen) < cfg.randomise
    if pick.any():
        x[pick] = random_lookup(x[pick], brain[pick], gen)
    pick = torch.rand(n, generator=gen) < cfg.blobs
    if pick.any():
        x[pick] = paste_blobs(x[pick], brain[pick], gen)
    saved = cfg.flip_lr
    cfg.flip_lr = False  # flipped above, with the labels
    try:
        x = intensity_augment(x, cfg, gen)
    finally:
        cfg.flip_lr = saved
    x = x + torch.randn(x.shape, generator=gen) * cfg.noise * torch.rand(n, 1, 1, 1, generator=gen) * brain
    return x * brain, y


def segmentation_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy plus soft Dice (mean over classes) over brain pixels (y >= 0)."""
    logits = logits.float()
    ce = F.cross_entropy(logits, y.clamp_min(0), reduction="none")
    inside = (y >= 0).float()
    ce = (ce * inside).sum() / inside.sum().clamp_min(1)
    p = logits.softmax(1) * inside[:, None]
    onehot = F.one_hot(y.clamp_min(0), logits.shape[1]).permute(0, 3, 1, 2).float() * inside[:, None]
    inter, total = (p * onehot).sum((0, 2, 3)), (p + onehot).sum((0, 2, 3))
    return ce + (1 - ((2 * inter + 1) / (total + 1)).mean())


def mean_dice(net, data: TissueSet, classes: int, dev: torch.device | None = None) -> tuple[float, dict[str, float]]:
    """Mean Dice of the predicted classes over a fixed sample of validation slices (run on
    the network's device)."""
    from .loop import to_device
    gen = torch.Generator().manual_seed(4321)
    idx = torch.randperm(len(data), generator=gen)[:VALIDATION_SLICES]
    inter, total = torch.zeros(classes), torch.zeros(classes)
    for s in range(0, len(idx), 64):
        b = idx[s:s + 64]
        pred = net(to_device(net, data.x[b])).argmax(1).cpu()
        y = data.y[b]
        for c in range(classes):
            p, t = (pred == c) & (y >= 0), y == c
            inter[c] += (p & t).sum()
            total[c] += p.sum() + t.sum()
    dice = (2 * inter / total.clamp_min(1)).tolist()
    return float(np.mean(dice)), {f"dice_{name}": d for name, d in zip(TISSUE_CLASSES, dice)}


def train_tissue(data: str | Path, out: str | Path, cfg: TissueTrainConfig, renders: str | Path | None = None,
                 resume: bool = False, force: bool = False, device: str = "cpu", cache_dir: str | Path | None = None,
                 progress: Callable[[str], None] | None = None, stop_after: int | None = None) -> Path:
    """Train the tissue segmenter on the parcellated T1 scans of ``data`` (t1/ and dlmuse/) and
    their renderings in ``renders`` (a ``render`` output folder), and write a ``tissue-unet``
    package offering ``anatomy`` into ``out``, reading T1 and uncalibrated: ``release
    --contrast C`` makes the model of each contrast, calibrated on renderings of it."""
    from ...core.package import build_network
    from ..data import check_run_folder, split_subjects
    from ..rendering import find_parcellated, source_subject
    say = progress or (lambda m: None)
    out = Path(out)
    check_run_folder(out, resume, force, out / "checkpoint" / "checkpoint.json")
    where = place(device, False, what="train-tissue")  # float32 (its config's bf16 is not used)
    dev = where.device
    sources = find_parcellated(data)
    split = split_subjects([s.id for s in sources], cfg.seed, cfg.val_fraction, cfg.calibration_fraction,
                           cfg.test_fraction)
    by_id = {s.id: s for s in sources}
    rendered: dict[str, list[Path]] = {}
    if renders is not None:
        for p in sorted(Path(renders).glob("*.nii*")):
            if not p.name.split(".")[0].endswith(("_brainmask", "_mask")):
                rendered.setdefault(source_subject(p.name.split(".")[0]), []).append(p)
    cache = Path(cache_dir) if cache_dir else out / ".cache"
    train_set = load_tissue_set([by_id[i] for i in split["train"]], rendered, cfg.contract, cache, say)
    val_set = load_tissue_set([by_id[i] for i in split["val"]], rendered, cfg.contract, cache, say)
    say(f"{len(split['train'])} training subjects ({len(train_set)} slices with their renderings), "
        f"{len(split['val'])} validation ({len(val_set)} slices); {cfg.steps} steps of {cfg.batch_size}")
    torch.manual_seed(cfg.seed)
    net = build_network({"type": "tissue-unet", **cfg.architecture}).to(dev)
    run = start_run(net, cfg, out, resume, say)
    classes = len(cfg.architecture["classes"])

    def batch_loss(step: int, gen: torch.Generator) -> torch.Tensor:
        idx = torch.randint(0, len(train_set), (cfg.batch_size,), generator=gen)
        x, y = augment(train_set.x[idx].clone(), train_set.y[idx].clone(), cfg, gen)
        return segmentation_loss(run.net(where.to(x)), y.to(dev))

    t_start = time.perf_counter()
    if not run_steps(run, cfg, batch_loss, lambda: mean_dice(run.net, val_set, classes, dev), say, stop_after,
                     higher_is_better=True, figure_name="validation Dice"):
        return out
    S = int(cfg.architecture["slice_size"])
    return write_trained_package(
        run, cfg, out, data, "tissue-unet", "anatomy",
        f"Anatomy-conditioned score: a contrast-agnostic tissue segmenter ({S}x{S} axial slices at "
        f"{cfg.spacing_mm:g} mm) and each voxel against its own tissue class in the scan",
        split, {}, dev, False, t_start, "best_val_dice", False, say,
        training_extra={"renders": str(renders) if renders else None})
