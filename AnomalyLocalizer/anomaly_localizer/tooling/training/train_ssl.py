"""``anomaly-localizer train-ssl``: the self-supervised anomaly segmentation U-Net
(:mod:`anomaly_localizer.core.detectors.ssl`).

Each batch takes healthy 2.5D training slices (the DAE's input: 2 mm, the slice and its
neighbours), the same intensity augmentation as the DAE (flips, contrast, gamma, bias field:
scanner differences), and inserts 1-3 synthetic anomalies of the training tasks
(:mod:`.ssl_tasks`) into most of them; the U-Net learns the label (how strongly each pixel
of the middle slice was changed) with binary cross-entropy inside the brain plus a soft Dice
term (:func:`segmentation_loss`).

Choosing the checkpoint: at each validation, a fixed set of validation subjects' slices
gets anomalies of the *held-out* tasks only (never trained on), half of the slices left
healthy; the checkpoint kept is the one whose pixel AP on them is highest, so it is the
network that best finds kinds of change it never saw, and the healthy half's false
positives count against it. Training tasks' AP on the same slices is recorded beside it
(the gap says how much the network learned its tasks rather than anomalies). No test,
calibration or tumour case is used. The loop, checkpoints and resume are
:mod:`.steps`'s, as for the DAE.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from ...core.detectors.ssl import DEFAULT_SSL_SCORING, SSLArchitecture
from ..data import SliceSet
from ..metrics import average_precision
from .ssl_tasks import HELD_OUT_TASKS, TRAIN_TASKS, make_batch
from .loop import to_device
from .steps import SliceContract, load_config, run_steps, set_up, write_trained_package
from .train_dae import augment

VALIDATION_SLICES = 192
DONOR_HEIGHT = 0.04  # a donor slice lies within this share of the brain's height of the host's


@dataclass
class SSLTrainConfig(SliceContract):
    architecture: dict[str, Any] = field(default_factory=lambda: SSLArchitecture().model_dump(exclude={"type"}))
    learning_rate: float = 5e-4
    steps: int = 3000
    validate_every: int = 250
    tasks: list[str] = field(default_factory=lambda: list(TRAIN_TASKS))
    held_out: list[str] = field(default_factory=lambda: list(HELD_OUT_TASKS))
    healthy_share: float = 0.1  # an anomaly in about 90 % of samples (MOOD 2022 winner)
    max_anomalies: int = 3
    dice_weight: float = 1.0  # soft Dice beside the cross-entropy (segmentation_loss)
    scoring: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_SSL_SCORING))

    @classmethod
    def from_json(cls, path: str | Path | None, **overrides: Any) -> "SSLTrainConfig":
        from ...errors import InputError
        from .ssl_tasks import ALL_TASKS

        cfg = load_config(cls, path, SSLArchitecture, DEFAULT_SSL_SCORING, **overrides)
        unknown = set(cfg.tasks) | set(cfg.held_out)
        if unknown - set(ALL_TASKS):
            raise InputError(f"unknown tasks {sorted(unknown - set(ALL_TASKS))}; known: {', '.join(ALL_TASKS)}")
        if set(cfg.tasks) & set(cfg.held_out) or not cfg.tasks or not cfg.held_out:
            raise InputError("training tasks and held-out tasks must both be given and must not overlap")
        return cfg


class DonorPicker:
    """Slices of other subjects at about the same height in the brain, for blended patches."""

    def __init__(self, data: SliceSet):
        self.data = data
        pos = data.position.numpy() if data.position is not None else np.zeros(len(data), np.float32)
        self.order = np.argsort(pos, kind="stable")
        self.sorted_pos = pos[self.order]
        self.pos = pos

    def pick(self, idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        out = []
        for i in idx.tolist():
            lo = np.searchsorted(self.sorted_pos, self.pos[i] - DONOR_HEIGHT)
            hi = max(lo + 1, np.searchsorted(self.sorted_pos, self.pos[i] + DONOR_HEIGHT, side="right"))
            j = i
            for _ in range(8):  # another subject when there is one nearby
                j = int(self.order[lo + int(torch.randint(hi - lo, (1,), generator=gen))])
                if self.data.subject[j] != self.data.subject[i]:
                    break
            out.append(j)
        return self.data.x[torch.tensor(out)]


def segmentation_loss(logits: torch.Tensor, label: torch.Tensor, mask: torch.Tensor,
                      dice_weight: float) -> torch.Tensor:
    """Binary cross-entropy with soft labels inside the brain, plus ``dice_weight`` times the
    soft Dice loss over the batch's brains. Anomalies are about 2 % of the brain: cross-entropy
    alone first learns to say "healthy" everywhere, and the Dice term, which counts the
    anomalous pixels only, makes the network find them from the first steps (as nnU-Net)."""
    m = mask.float()
    logits = logits.float()
    bce = (F.binary_cross_entropy_with_logits(logits, label, reduction="none") * m).sum() / m.sum().clamp_min(1.0)
    if dice_weight <= 0:
        return bce
    p = torch.sigmoid(logits) * m
    dice = 1 - (2 * (p * label).sum() + 1.0) / (p.sum() + (label * m).sum() + 1.0)
    return bce + dice_weight * dice


def validation_sets(data: SliceSet, cfg: SSLTrainConfig) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Fixed validation slices for the held-out and the training tasks: (x, label, brain)."""
    gen = torch.Generator().manual_seed(cfg.seed * 7 + 4242)
    idx = torch.randperm(len(data), generator=gen)[:VALIDATION_SLICES]
    donors = DonorPicker(data).pick(idx, gen)
    sets = {}
    for name, tasks in (("held_out", tuple(cfg.held_out)), ("train_tasks", tuple(cfg.tasks))):
        x, label = make_batch(data.x[idx], donors, tasks, gen, healthy_share=0.5, max_anomalies=1)
        sets[name] = (x, label, data.mask[idx])
    return sets


def validation_figures(net, sets, flip: bool) -> tuple[float, dict[str, float]]:
    """Pixel AP inside the brain (any change counts) per set; the held-out one picks."""
    from ...core.detectors.ssl import predict
    figures = {}
    for name, (x, label, brain) in sets.items():
        probs = torch.cat([predict(net, to_device(net, x[s:s + 64]), flip).cpu() for s in range(0, len(x), 64)])
        inside = brain.bool()
        figures[f"{name}_ap"] = average_precision(probs[inside].numpy(), (label[inside] > 0).numpy())
    return figures["held_out_ap"], {"train_tasks_ap": figures["train_tasks_ap"]}


def train_ssl(data: str | Path, out: str | Path, cfg: SSLTrainConfig, resume: bool = False, force: bool = False,
              device: str = "cpu", cache_dir: str | Path | None = None,
              progress: Callable[[str], None] | None = None, calibrate: bool = True,
              stop_after: int | None = None) -> Path:
    """Train the self-supervised U-Net and write a ``unet-ssl`` package into ``out``.
    ``stop_after``: stop after that many steps of this run, at a checkpoint (``resume``
    continues exactly)."""
    say = progress or (lambda m: None)
    out = Path(out)
    st = set_up(data, out, cfg, "unet-ssl", resume, force, device, cache_dir, say,
                f"tasks {', '.join(cfg.tasks)}; held out {', '.join(cfg.held_out)}")
    run, train_set, val_set, dev = st.run, st.train_set, st.val_set, st.dev
    donors = DonorPicker(train_set)
    sets = validation_sets(val_set, cfg)
    tasks = tuple(cfg.tasks)

    def batch_loss(step: int, gen: torch.Generator) -> torch.Tensor:
        idx = torch.randint(0, len(train_set), (cfg.batch_size,), generator=gen)
        healthy = augment(train_set.x[idx], cfg, gen)
        x, label = make_batch(healthy, donors.pick(idx, gen), tasks, gen, cfg.healthy_share, cfg.max_anomalies)
        with st.autocast:
            logits = run.net(st.where.to(x))
        brain = healthy[:, healthy.shape[1] // 2:healthy.shape[1] // 2 + 1] != 0  # after augmentation: a flip moves the brain
        return segmentation_loss(logits, label.to(dev), brain.to(dev), cfg.dice_weight)

    t_start = time.perf_counter()
    done = run_steps(run, cfg, batch_loss, lambda: validation_figures(run.net, sets, bool(cfg.scoring["flip"])), say,
                     stop_after, higher_is_better=True, figure_name="held-out pixel AP")
    if not done:
        return out
    S = int(cfg.architecture["slice_size"])
    return write_trained_package(
        run, cfg, out, data, "unet-ssl", "ssl",
        f"Self-supervised anomaly segmentation U-Net (synthetic anomalies, held-out tasks), {S}x{S} axial slices at "
        f"{cfg.spacing_mm:g} mm with {cfg.architecture['in_channels']} neighbouring slices",
        st.split, st.by_id, dev, st.use_bf16, t_start, "best_val_figure", calibrate, say,
        {"selection": "pixel AP on validation slices with held-out tasks (half left healthy)"})
