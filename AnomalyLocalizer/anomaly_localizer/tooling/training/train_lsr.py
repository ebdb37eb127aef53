"""``anomaly-localizer train-lsr``: the VQ-VAE and its code prior for latent space restoration.

Two stages on the same subject split as :mod:`anomaly_localizer.train` (train / validation /
calibration / held-back test, by subject):

1. the VQ-VAE (L1 reconstruction + codebook + commitment terms), with the VAE's
   augmentation; codebook entries are initialised from encoder outputs and an entry no
   slice used in an epoch is restarted on a random encoder output (dead codes waste the
   codebook);
2. the prior, on the code grids of the training slices (and their left-right mirror
   images) with each slice's position in the brain as the condition.

Each stage: Adam, learning rate divided by 10 on a validation plateau, early stop, best
validation weights kept. A checkpoint after every epoch (safetensors + JSON) lets
``--resume`` continue an interrupted run.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ... import __version__
from ...core.lsr import DEFAULT_LSR_SCORING
from ...core.models.lsr import DEFAULT_LSR, full_lsr_architecture
from ...core.package import build_network, save_package
from ...core.volume import NORMALISATION
from ...errors import InputError
from ..data import check_run_folder, split_slices
from .loop import place, to_device
from .steps import LoopPlan, load_best, read_config_values, run_steps, start_run, training_record
from .train import TrainConfig, augment


@dataclass
class LSRTrainConfig:
    architecture: dict[str, Any] = field(default_factory=lambda: json.loads(json.dumps(DEFAULT_LSR)))
    spacing_mm: float = 3.0  # 64 x 3 mm: the VAE's field of view; codes of 12 mm as in the paper
    modality: str = "T1w"
    seed: int = 0
    batch_size: int = 64
    vqvae_learning_rate: float = 3e-4
    prior_learning_rate: float = 3e-4
    vqvae_epochs: int = 20
    prior_epochs: int = 20
    plateau_patience: int = 1
    early_stop_patience: int = 3
    val_fraction: float = 0.1
    calibration_fraction: float = 0.15
    test_fraction: float = 0.15
    scoring: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_LSR_SCORING))

    @classmethod
    def from_json(cls, path: str | Path | None, **overrides: Any) -> "LSRTrainConfig":
        cfg = cls(**read_config_values(path, set(cls.__dataclass_fields__)))
        for k, v in overrides.items():
            if v is not None:
                setattr(cfg, k, v)
        cfg.architecture = full_lsr_architecture(cfg.architecture)
        cfg.scoring = {**DEFAULT_LSR_SCORING, **cfg.scoring}
        return cfg

    @property
    def contract(self) -> dict[str, Any]:
        return {"modality": self.modality, "orientation": "axial", "slice_size": int(self.architecture["slice_size"]),
                "spacing_mm": float(self.spacing_mm), "normalisation": NORMALISATION}


def _augmentation(seed: int) -> TrainConfig:
    """The VAE's augmentation settings (flips, small rotations and scaling, brightness, noise)."""
    return TrainConfig(seed=seed)


def _restart_dead_codes(vq, usage: torch.Tensor, z_e: torch.Tensor, gen: torch.Generator) -> int:
    dead = torch.nonzero(usage == 0).flatten()
    if dead.numel() == 0:
        return 0
    flat = z_e.detach().permute(0, 2, 3, 1).reshape(-1, z_e.shape[1])
    pick = torch.randint(0, flat.shape[0], (dead.numel(),), generator=gen).to(flat.device)  # drawn on the CPU
    dead = dead.to(flat.device)
    with torch.no_grad():
        vq.codebook.weight[dead] = flat[pick]
    return int(dead.numel())


def _run_stage(name: str, module: torch.nn.Module, lr: float, max_epochs: int, batches: int, cfg: LSRTrainConfig,
               batch_loss, val_fn: Callable[[], float], out: Path, resume: bool, say: Callable[[str], None],
               after_step: Callable[[int], None] | None = None) -> dict[str, Any]:
    """One stage through the training loop (:func:`.steps.run_steps`): epochs of ``batches``
    steps, Adam at ``lr`` divided by 10 on a validation plateau, early stop, best weights
    kept, a checkpoint per epoch in ``checkpoint/NAME``; ``module`` ends with its best weights."""
    optimizer = torch.optim.Adam(module.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.1, patience=cfg.plateau_patience)
    stage_dir = out / "checkpoint" / name
    again = resume and (stage_dir / "checkpoint.json").is_file()
    run = start_run(module, cfg, out, again, lambda m: say(f"{name}: {m}"), optimizer, sched, ckpt_dir=stage_dir,
                    free=("vqvae_epochs", "prior_epochs"))
    plan = LoopPlan.epochs(max_epochs, batches, cfg.seed, cfg.plateau_patience, cfg.early_stop_patience)
    run_steps(run, plan, batch_loss, lambda: (val_fn(), {}), lambda m: say(f"{name} {m}"), after_step=after_step)
    load_best(run)
    return training_record(run, plan)


class _EpochDraws:
    """A stage's random draws: one generator per epoch (seeded by ``base`` and the epoch),
    which shuffles the epoch's order of ``n`` items and then draws its augmentation."""

    def __init__(self, base: int, n: int, batches: int):
        self.base, self.n, self.batches, self.epoch = base, n, max(batches, 1), None

    def at(self, step: int) -> tuple[int, int]:
        """(epoch from 1, batch) of ``step``, the epoch's generator and order made on its first batch."""
        epoch, b = divmod(step, self.batches)
        if self.epoch != epoch + 1:
            self.epoch = epoch + 1
            self.gen = torch.Generator().manual_seed(self.base + self.epoch)
            self.order = torch.randperm(self.n, generator=self.gen)
        return self.epoch, b


def encode_codes(vq, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([vq.encode(x[s:s + batch]) for s in range(0, x.shape[0], batch)])


def train_lsr(data: str | Path, out: str | Path, cfg: LSRTrainConfig, resume: bool = False, force: bool = False,
              device: str = "cpu", cache_dir: str | Path | None = None,
              progress: Callable[[str], None] | None = None, calibrate: bool = True) -> Path:
    """Train the VQ-VAE, then the prior, and write a ``vqvae-lsr`` package into ``out``."""
    say = progress or (lambda m: None)
    out = Path(out)
    ckpt_dir = out / "checkpoint"
    check_run_folder(out, resume, force, ckpt_dir)
    if resume and (ckpt_dir / "config.json").is_file():
        # The epoch limits may change on resume (to stop a stage early or extend it).
        free = {"vqvae_epochs": None, "prior_epochs": None}
        if {**json.loads((ckpt_dir / "config.json").read_text()), **free} != {**json.loads(json.dumps(asdict(cfg))), **free}:
            raise InputError(f"the configuration differs from the one {out} was trained with; "
                             "resume with the same options or start over with --force")
    dev = place(device, False, what="train-lsr").device  # float32
    split, by_id, train_set, val_set = split_slices(data, cfg, Path(cache_dir) if cache_dir else out / ".cache")
    say(f"slices: {len(train_set)} train, {len(val_set)} validation")
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    (ckpt_dir / "config.json").write_text(json.dumps(asdict(cfg)))

    torch.manual_seed(cfg.seed)
    model = build_network(cfg.architecture).to(dev)
    vq, prior = model.vqvae, model.prior
    aug = _augmentation(cfg.seed)
    t_start = time.perf_counter()

    # ---- stage 1: VQ-VAE
    if not resume or not (ckpt_dir / "vqvae" / "checkpoint.json").is_file():
        with torch.no_grad():  # codebook from encoder outputs of random training slices
            g = torch.Generator().manual_seed(cfg.seed)
            idx = torch.randperm(len(train_set), generator=g)[:256]
            z = vq.encode_continuous(train_set.x[idx].to(dev)).permute(0, 2, 3, 1).reshape(-1, vq.codebook.weight.shape[1])
            vq.codebook.weight.copy_(z[torch.randperm(z.shape[0], generator=g)[:vq.codebook_size].to(dev)])

    vq_batches = len(train_set) // cfg.batch_size
    vq_draws = _EpochDraws(cfg.seed * 100003, len(train_set), vq_batches)
    usage = torch.zeros(vq.codebook_size, dtype=torch.long)

    def vq_batch(step: int, _: torch.Generator) -> torch.Tensor:
        _, b = vq_draws.at(step)
        x = augment(train_set.x[vq_draws.order[b * cfg.batch_size:(b + 1) * cfg.batch_size]], aug, vq_draws.gen).to(dev)
        vq_draws.x = x
        return vq.loss(x)[0]

    def vq_after(step: int) -> None:
        # count the codes each slice uses after the step; at an early epoch's end, restart the unused
        epoch, b = vq_draws.at(step)
        if b == 0:
            usage.zero_()
        with torch.no_grad():
            z_e = vq.encode_continuous(vq_draws.x)
            usage.add_(torch.bincount(vq.quantise(z_e).flatten().cpu(), minlength=vq.codebook_size))
        if b == vq_draws.batches - 1 and epoch <= cfg.vqvae_epochs // 2:  # restarts only early, then let it settle
            restarted = _restart_dead_codes(vq, usage, z_e, vq_draws.gen)
            if restarted:
                say(f"vqvae epoch {epoch}: restarted {restarted} unused codebook entries")

    def vq_val() -> float:
        return float(np.mean([vq.loss(to_device(vq, val_set.x[s:s + 256]))[1].item() for s in range(0, len(val_set), 256)]))

    vq_record = _run_stage("vqvae", vq, cfg.vqvae_learning_rate, cfg.vqvae_epochs, vq_batches, cfg, vq_batch, vq_val,
                           out, resume, say, after_step=vq_after)

    # ---- stage 2: the prior on the code grids (and their mirror images)
    train_codes = torch.cat([encode_codes(vq, train_set.x.to(dev)), encode_codes(vq, train_set.x.flip(-1).to(dev))])
    train_pos = torch.cat([train_set.position, train_set.position]).to(dev)
    val_codes = encode_codes(vq, val_set.x.to(dev))
    val_pos = val_set.position.to(dev)
    used = int(torch.unique(train_codes).numel())
    say(f"codebook: {used} of {vq.codebook_size} entries used by the training slices")

    prior_batches = train_codes.shape[0] // cfg.batch_size
    prior_draws = _EpochDraws(cfg.seed * 100003 + 50000, train_codes.shape[0], prior_batches)

    def prior_batch(step: int, _: torch.Generator) -> torch.Tensor:
        _, b = prior_draws.at(step)
        i = prior_draws.order[b * cfg.batch_size:(b + 1) * cfg.batch_size].to(train_codes.device)  # drawn on the CPU
        return prior.nll(train_codes[i], train_pos[i]).mean()

    def prior_val() -> float:
        return float(torch.cat([prior.nll(val_codes[s:s + 256], val_pos[s:s + 256]).flatten()
                                for s in range(0, val_codes.shape[0], 256)]).mean())

    prior_record = _run_stage("prior", prior, cfg.prior_learning_rate, cfg.prior_epochs, prior_batches, cfg,
                              prior_batch, prior_val, out, resume, say)
    S = int(cfg.architecture["slice_size"])
    meta = {
        "name": out.name,
        "summary": f"VQ-VAE + PixelSNAIL-style prior (latent space restoration), {S}x{S} at {cfg.spacing_mm:g} mm, "
                   f"codebook {cfg.architecture['vqvae']['codebook_size']}, code grid {vq.grid_size}x{vq.grid_size}",
        "architecture": cfg.architecture,
        "input_contract": cfg.contract,
        "lsr": dict(cfg.scoring),
        "recommended_method": "lsr",
        "calibration": {},
        "provenance": {"engine_version": __version__, "data": str(Path(data)), "subjects": split,
                       "trained": time.strftime("%Y-%m-%d"), "torch": torch.__version__},
        "training": {"config": asdict(cfg), "vqvae": vq_record, "prior": prior_record,
                     "codebook_entries_used": used, "threads_per_process": torch.get_num_threads(),
                     "seconds_this_run": time.perf_counter() - t_start},
    }
    package = save_package(model, meta, out)
    say(f"wrote {out}")
    if calibrate and split["calibration"]:
        from ..release.calibrate import calibrate_package
        calibrate_package(package, [by_id[i] for i in split["calibration"]], device=dev.type, progress=say)
    return out
