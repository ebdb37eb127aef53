"""``anomaly-localizer train-dae``: the coarse-noise denoising autoencoder
(:mod:`anomaly_localizer.core.detectors.dae`; Kascenas et al., MIDL 2022).

Healthy 2.5D slices (the slice and its neighbours as channels, 2 mm in-plane) get coarse
noise: Gaussian noise drawn on a ``noise_res`` x ``noise_res`` grid, upsampled bilinearly
to the slice, randomly rolled, and added inside the brain (the same field on every channel,
as a 3D structure would span neighbouring slices). The U-Net learns to return the clean
middle slice; the loss is the squared error inside its brain. Too weak a noise and the
skip connections learn to copy anomalies through; the noise scale is chosen on validation
cases (README, "Results").

Against scanner differences, each training slice also gets a random contrast, gamma and
smooth multiplicative bias field inside the brain (all channels alike).

The loop (AdamW, cosine schedule, validation loss every ``validate_every`` steps, best
weights kept, checkpoints that ``--resume`` continues exactly) is :mod:`.steps`'s; device
and precision are :mod:`.loop`'s: bf16 autocast with channels-last tensors on GPUs with bf16
and on CPUs that have bf16 matrix instructions; elsewhere float32, because emulated bf16 made
a step ten times slower on an AVX2 machine (the validation loss is always computed in float32).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ...core.detectors.dae import DEFAULT_DAE_SCORING, DAEArchitecture
from ..data import SliceSet
from .loop import to_device
from .steps import SliceContract, load_config, run_steps, set_up, write_trained_package

VALIDATION_SLICES = 384


@dataclass
class DAETrainConfig(SliceContract):
    architecture: dict[str, Any] = field(default_factory=lambda: DAEArchitecture().model_dump(exclude={"type"}))
    learning_rate: float = 2e-4
    steps: int = 4000
    validate_every: int = 200
    noise_std: float = 0.1  # in normalised intensity (the brain's IQR is 0.25)
    noise_res: int = 14  # coarse noise grid side (Kascenas: 16 for 128 px)
    scoring: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_DAE_SCORING))

    @classmethod
    def from_json(cls, path: str | Path | None, **overrides: Any) -> "DAETrainConfig":
        return load_config(cls, path, DAEArchitecture, DEFAULT_DAE_SCORING, **overrides)


def coarse_noise(n: int, size: int, res: int, std: float, gen: torch.Generator) -> torch.Tensor:
    """(n,1,size,size) Gaussian noise drawn at res x res, upsampled and randomly rolled."""
    coarse = torch.randn(n, 1, res, res, generator=gen) * std
    noise = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    shifts = torch.randint(0, size, (n, 2), generator=gen)
    return torch.stack([torch.roll(noise[i], (int(shifts[i, 0]), int(shifts[i, 1])), dims=(-2, -1))
                        for i in range(n)])


def augment(x: torch.Tensor, cfg: DAETrainConfig, gen: torch.Generator) -> torch.Tensor:
    """Left-right flips and intensity changes inside the brain (x != 0), the same on every
    channel of a slice: contrast, gamma on the positive part, a smooth bias field."""
    n, _, s, _ = x.shape
    u = lambda *shape: torch.rand(*shape, generator=gen)  # noqa: E731
    if cfg.flip_lr:
        x = torch.where((u(n) < 0.5)[:, None, None, None], x.flip(-1), x)
    brain = x != 0
    gain = 1 + (u(n, 1, 1, 1) * 2 - 1) * cfg.contrast
    gamma = torch.exp((u(n, 1, 1, 1) * 2 - 1) * cfg.gamma)
    field_ = 1 + F.interpolate((u(n, 1, 3, 3) * 2 - 1) * cfg.bias_field, size=(s, s), mode="bicubic",
                               align_corners=False)
    y = torch.where(x > 0, x.clamp_min(0) ** gamma, x) * gain * field_
    return torch.where(brain, y, x)


def noisy_input(x: torch.Tensor, cfg: DAETrainConfig, gen: torch.Generator) -> torch.Tensor:
    noise = coarse_noise(x.shape[0], x.shape[-1], cfg.noise_res, cfg.noise_std, gen)
    return x + noise * (x != 0)


def masked_mse(out: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.float()
    return ((out.float() - target) ** 2 * m).sum() / m.sum().clamp_min(1.0)


def validation_loss(net, data: SliceSet, cfg: DAETrainConfig) -> float:
    """Masked MSE of restoring fixed-noise validation slices (float32, deterministic)."""
    gen = torch.Generator().manual_seed(cfg.seed * 7 + 12345)
    idx = torch.randperm(len(data), generator=gen)[:VALIDATION_SLICES]
    mid = data.x.shape[1] // 2
    total, weight = 0.0, 0.0
    net.eval()
    with torch.no_grad():
        for s in range(0, len(idx), 64):
            b = idx[s:s + 64]
            x, m = data.x[b], data.mask[b]
            # noise drawn on the CPU (the same numbers on every device), run on the network's device
            x, m, noisy = to_device(net, x, m, noisy_input(x, cfg, gen))
            out = net(noisy)
            w = float(m.sum())
            total += float(masked_mse(out, x[:, mid:mid + 1], m)) * w
            weight += w
    net.train()
    return total / max(weight, 1.0)


def train_dae(data: str | Path, out: str | Path, cfg: DAETrainConfig, resume: bool = False, force: bool = False,
              device: str = "cpu", cache_dir: str | Path | None = None,
              progress: Callable[[str], None] | None = None, calibrate: bool = True,
              stop_after: int | None = None) -> Path:
    """Train the denoising U-Net and write a ``unet-dae`` package into ``out``. With
    ``stop_after``, stop after that many steps of this run, at a checkpoint, without writing
    the package: ``resume`` continues exactly (for runs longer than a session)."""
    say = progress or (lambda m: None)
    out = Path(out)
    st = set_up(data, out, cfg, "unet-dae", resume, force, device, cache_dir, say,
                f"noise {cfg.noise_std:g} at {cfg.noise_res}x{cfg.noise_res}")
    run, train_set, val_set, dev = st.run, st.train_set, st.val_set, st.dev
    mid = cfg.architecture["in_channels"] // 2

    def batch_loss(step: int, gen: torch.Generator) -> torch.Tensor:
        idx = torch.randint(0, len(train_set), (cfg.batch_size,), generator=gen)
        x = augment(train_set.x[idx], cfg, gen)
        target = x[:, mid:mid + 1]
        mask = target != 0  # the brain after augmentation (a flip moves it; the cached mask does not)
        noisy = st.where.to(noisy_input(x, cfg, gen))
        with st.autocast:
            restored = run.net(noisy)
        return masked_mse(restored, target.to(dev), mask.to(dev))

    t_start = time.perf_counter()
    if not run_steps(run, cfg, batch_loss, lambda: (validation_loss(run.net, val_set, cfg), {}), say, stop_after):
        return out
    S = int(cfg.architecture["slice_size"])
    return write_trained_package(
        run, cfg, out, data, "unet-dae", "dae",
        f"Coarse-noise denoising autoencoder (Kascenas et al. 2022), {S}x{S} axial slices at {cfg.spacing_mm:g} mm "
        f"with {cfg.architecture['in_channels']} neighbouring slices as input",
        st.split, st.by_id, dev, st.use_bf16, t_start, "best_val_loss", calibrate, say)
