"""``anomaly-localizer train``: from a folder of healthy scans to a model package.

The paper's schedule: Adam at 1e-4, learning rate divided by 10 when the validation loss
plateaus, early stop after ``early_stop_patience`` epochs without improvement. Subjects are
split into train / validation / held-back test (healthy) sets, recorded in the package;
the test subjects calibrate the thresholds (:mod:`anomaly_localizer.calibrate`).

Runs on one process or under ``torchrun`` (DistributedDataParallel; gloo on CPU, NCCL on
GPU): every rank draws the same shuffled order and takes its own share of each batch, so
the effective batch is ``batch_size`` whatever the number of processes.

The epochs run through the one training loop (:func:`.steps.run_steps`: a validation and a
checkpoint per epoch, the plateau schedule, the early stop); checkpoints (``OUT/checkpoint/``)
are safetensors + JSON like everything else; ``--resume`` continues an interrupted run bit for bit.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ... import __version__
from ...core.models.vae import DEFAULT_ARCHITECTURE
from ...core.package import build_network, save_package
from ...core.scores import kl_divergence, rec_nll
from ...core.volume import NORMALISATION
from ...errors import InputError
from ..data import SliceSet, find_subjects, load_slices, split_subjects
from .loop import load_checkpoint, normal_like, place, save_checkpoint, to_device
from .steps import LoopPlan, load_best, read_config_values, run_steps, start_run, training_record

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    architecture: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_ARCHITECTURE))
    spacing_mm: float = 3.0  # model pixel spacing; slice_size * spacing_mm is the field of view
    modality: str = "T1w"
    seed: int = 0
    batch_size: int = 64
    learning_rate: float = 1e-4
    max_epochs: int = 100
    plateau_patience: int = 1  # epochs without improvement before the learning rate drops
    early_stop_patience: int = 3
    val_fraction: float = 0.1
    calibration_fraction: float = 0.15
    test_fraction: float = 0.15
    # augmentation (reference code: flips, rotations, scaling, brightness, noise)
    flip_lr: bool = True
    rotate_deg: float = 10.0
    scale_range: float = 0.1
    brightness: float = 0.1
    noise_std: float = 0.02
    # ceVAE in-painting task
    ce_weight: float = 0.5
    ce_squares: int = 2
    ce_square_frac: tuple[float, float] = (0.1, 0.3)

    @classmethod
    def from_json(cls, path: str | Path | None, **overrides: Any) -> "TrainConfig":
        values = read_config_values(path, set(cls.__dataclass_fields__))
        cfg = cls(**{k: v for k, v in values.items() if k != "architecture"})
        cfg.architecture = {**DEFAULT_ARCHITECTURE, **values.get("architecture", {})}
        for k, v in overrides.items():
            if v is None:
                continue
            if k in cfg.architecture or k == "type":
                cfg.architecture[k] = v
            else:
                setattr(cfg, k, v)
        cfg.ce_square_frac = tuple(cfg.ce_square_frac)
        return cfg

    @property
    def contract(self) -> dict[str, Any]:
        return {"modality": self.modality, "orientation": "axial", "slice_size": int(self.architecture["slice_size"]),
                "spacing_mm": float(self.spacing_mm), "normalisation": NORMALISATION}


# ---------------------------------------------------------------------------- augmentation

def augment(x: torch.Tensor, cfg: TrainConfig, gen: torch.Generator) -> torch.Tensor:
    """Random LR flips, rotations, scaling, brightness and noise; background stays 0."""
    n = x.shape[0]
    u = lambda *shape: torch.rand(*shape, generator=gen)
    if cfg.flip_lr:
        flip = u(n) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    angle = (u(n) * 2 - 1) * math.radians(cfg.rotate_deg)
    scale = 1 + (u(n) * 2 - 1) * cfg.scale_range
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, torch.zeros(n)], 1), torch.stack([sin, cos, torch.zeros(n)], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    brain = x != 0
    gain = 1 + (u(n, 1, 1, 1) * 2 - 1) * cfg.brightness
    shift = (u(n, 1, 1, 1) * 2 - 1) * cfg.brightness * 0.5
    noise = torch.randn(x.shape, generator=gen) * (u(n, 1, 1, 1) * cfg.noise_std)
    return torch.where(brain, x * gain + shift + noise, x)


def square_masks(n: int, size: int, cfg: TrainConfig, gen: torch.Generator) -> torch.Tensor:
    """(n,1,S,S) bool: ``ce_squares`` random squares per slice for the in-painting task."""
    masks = torch.zeros(n, 1, size, size, dtype=torch.bool)
    lo, hi = cfg.ce_square_frac
    for i in range(n):
        for _ in range(cfg.ce_squares):
            side = int(size * (lo + (hi - lo) * torch.rand(1, generator=gen).item()))
            r, c = (torch.randint(0, size - side + 1, (2,), generator=gen)).tolist()
            masks[i, 0, r:r + side, c:c + side] = True
    return masks


# ------------------------------------------------------------------------------- losses

def vae_loss(model, x: torch.Tensor, sample: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean negative ELBO of a batch and its mean reconstruction and KL terms."""
    mu, logvar = model.encode(x)
    z = mu + normal_like(mu) * (0.5 * logvar).exp() if sample else mu  # drawn on the CPU: the same on every device
    _, rec = rec_nll(x, model.decode(z), model)
    kl = kl_divergence(mu, logvar)
    return (rec + kl).mean(), rec.mean(), kl.mean()


def cevae_loss(model, x: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """In-painting term: reconstruct the full slice from an input with squares blanked out."""
    mu, _ = model.encode(torch.where(masks, torch.zeros_like(x), x))
    _, rec = rec_nll(x, model.decode(mu), model)
    return rec.mean()


class Objective(torch.nn.Module):
    """The training loss as a module, so DistributedDataParallel can wrap it.

    forward(x, ce_masks) -> (loss, rec, kl): the mean negative ELBO (z sampled), plus for
    the ceVAE the in-painting term, weighted ``ce_weight``.
    """

    def __init__(self, model, ce_weight: float = 0.0):
        super().__init__()
        self.model = model
        self.ce_weight = ce_weight

    def forward(self, x: torch.Tensor, ce_masks: torch.Tensor | None = None):
        loss, rec, kl = vae_loss(self.model, x)
        if ce_masks is not None:
            loss = (1 - self.ce_weight) * loss + self.ce_weight * cevae_loss(self.model, x, ce_masks)
        return loss, rec, kl


# --------------------------------------------------------------------------- checkpoints

_save_checkpoint, _load_checkpoint = save_checkpoint, load_checkpoint  # older names, kept for callers


# ------------------------------------------------------------------------------ training

class _Progress:
    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.t0 = time.perf_counter()

    def line(self, text: str) -> None:
        if self.enabled:
            print(("\r" + text).ljust(100), file=sys.stderr, flush=True)


def _state_hash(model) -> str:
    import hashlib
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def evaluate_loss(model, data: SliceSet, batch: int = 256) -> float:
    """Mean negative ELBO (z = mean) on validation slices: deterministic."""
    model.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(data), batch):
            x = to_device(model, data.x[s:s + batch])
            loss, _, _ = vae_loss(model, x, sample=False)
            total += loss.item() * x.shape[0]
            n += x.shape[0]
    model.train()
    return total / max(n, 1)


def train(data: str | Path, out: str | Path, cfg: TrainConfig, resume: bool = False, force: bool = False,
          device: str = "cpu", cache_dir: str | Path | None = None, progress: bool = True,
          calibrate: bool = True) -> Path:
    """Train a VAE or ceVAE and write a model package into ``out``. Returns ``out``."""
    out = Path(out)
    ckpt_dir = out / "checkpoint"
    if out.exists() and any(out.iterdir()) and not (resume or force):
        raise InputError(f"{out} already exists; pass --resume to continue its training or --force to start over")
    if resume and not (ckpt_dir / "checkpoint.json").is_file():
        raise InputError(f"nothing to resume in {out} (no checkpoint); start without --resume")
    where = place(device, bf16=False, distributed=True, what="train")  # the VAE trains in float32
    dev, rank, world = where.device, where.rank, where.world

    subjects = find_subjects(data)
    split = split_subjects([s.id for s in subjects], cfg.seed, cfg.val_fraction, cfg.calibration_fraction,
                           cfg.test_fraction)
    by_id = {s.id: s for s in subjects}
    cache = Path(cache_dir) if cache_dir else Path(out) / ".cache"
    pr = _Progress(progress and rank == 0)
    pr.line(f"subjects: {len(split['train'])} train, {len(split['val'])} validation, "
            f"{len(split['calibration'])} calibration, {len(split['test'])} held-back test")
    train_set = load_slices([by_id[i] for i in split["train"]], cfg.contract, cache)
    val_set = load_slices([by_id[i] for i in split["val"]], cfg.contract, cache) if split["val"] else train_set
    pr.line(f"slices: {len(train_set)} train, {len(val_set)} validation (cached in {cache})")

    torch.manual_seed(cfg.seed)
    model = build_network(cfg.architecture).to(dev)
    ce = cfg.architecture["type"] == "cevae"
    objective = Objective(model, cfg.ce_weight if ce else 0.0)
    net = where.wrap(objective)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.1, patience=cfg.plateau_patience)
    # max_epochs may grow on resume ("--resume --epochs N"); everything else must match
    run = start_run(model, cfg, out, resume, pr.line, optimizer, sched, free=("max_epochs",))
    n_batches = len(train_set) // cfg.batch_size
    plan = LoopPlan.epochs(cfg.max_epochs, n_batches, cfg.seed, cfg.plateau_patience, cfg.early_stop_patience)

    S = int(cfg.architecture["slice_size"])
    epoch_draws: dict[str, Any] = {}

    def batch_loss(step: int, _: torch.Generator):
        # one shuffled order per epoch, the same on every rank; each rank augments its own share
        epoch, b = divmod(step, plan.epoch_steps) if plan.epoch_steps else (0, step)
        if epoch_draws.get("epoch") != epoch + 1:
            gen = torch.Generator().manual_seed(cfg.seed * 100003 + epoch + 1)
            epoch_draws.update(epoch=epoch + 1, order=torch.randperm(len(train_set), generator=gen),
                               rank_gen=torch.Generator().manual_seed(cfg.seed * 100003 + (epoch + 1) * 7919 + rank))
        order, rank_gen = epoch_draws["order"], epoch_draws["rank_gen"]
        idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size][rank::world]
        x = where.to(augment(train_set.x[idx], cfg, rank_gen))
        masks = where.to(square_masks(x.shape[0], S, cfg, rank_gen)) if ce else None
        loss, rec, kl = net(x, masks)
        return loss, {"rec": rec.detach(), "kl": kl.detach()}

    t_start = time.perf_counter()
    run_steps(run, plan, batch_loss, lambda: (evaluate_loss(model, val_set), {}), pr.line, writes=rank == 0)
    state = run.state
    train_seconds = time.perf_counter() - t_start

    if world > 1:
        # Each rank records a hash of its final weights: DDP must keep them identical.
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        (ckpt_dir / f"weights-rank{rank}.sha256").write_text(_state_hash(model) + "\n")
    where.finish()
    if rank != 0:
        return out
    model = load_best(run)
    meta = {
        "name": out.name,
        "summary": f"{cfg.architecture['type'].upper()} {S}x{S} at {cfg.spacing_mm:g} mm, "
                   f"latent {cfg.architecture['latent_size']}, c={cfg.architecture['likelihood_std']:g}",
        "architecture": cfg.architecture,
        "input_contract": cfg.contract,
        "calibration": {},
        "provenance": {"engine_version": __version__, "data": str(Path(data)), "subjects": split,
                       "trained": time.strftime("%Y-%m-%d"), "torch": torch.__version__},
        "training": {"config": asdict(cfg), **training_record(run, plan), "processes": world,
                     "threads_per_process": torch.get_num_threads(),
                     "seconds_this_run": train_seconds},
    }
    package = save_package(model, meta, out)
    pr.line(f"wrote {out} (best epoch {state['best_step'] // plan.epoch_steps}, validation loss "
            f"{state['best_val']:.2f})")
    if calibrate and split["calibration"]:
        from ..release.calibrate import calibrate_package
        calibrate_package(package, [by_id[i] for i in split["calibration"]], device=dev.type, progress=pr.line)
    return out
