"""The convolutional VAE of Zimmerer et al. (MICCAI 2019) and its context-encoding variant.

Encoder: one strided 4x4 convolution (stride 2) per entry of ``feature_maps``, each followed
by LeakyReLU, then a convolution whose kernel covers the remaining feature map and yields
the mean and log-variance of q(z|x) (``latent_size`` each, 1x1 spatially). The decoder
mirrors it with transposed convolutions. The likelihood p(x|z) is Gaussian with a fixed
standard deviation ``likelihood_std`` (the paper's c).

The ceVAE (``type: "cevae"``) is the same network; only its training adds the in-painting
task (:mod:`anomaly_localizer.train`), so scoring is identical.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

DEFAULT_ARCHITECTURE: dict[str, Any] = {
    "type": "vae",
    "slice_size": 64,
    "feature_maps": [16, 32, 64, 256],
    "latent_size": 256,
    "likelihood_std": 1.0,
}


class ConvVAE(nn.Module):
    """2D convolutional VAE on single-channel square slices of side ``slice_size``.

    ``forward`` is not defined on purpose: scoring and training need different parts
    (:meth:`encode`, :meth:`decode`), and the losses live in :mod:`anomaly_localizer.scores`.
    """

    def __init__(self, slice_size: int = 64, feature_maps: list[int] | tuple[int, ...] = (16, 32, 64, 256),
                 latent_size: int = 256, likelihood_std: float = 1.0, negative_slope: float = 0.01, **_: Any):
        super().__init__()
        self.slice_size = int(slice_size)
        self.latent_size = int(latent_size)
        self.likelihood_std = float(likelihood_std)
        maps = [int(m) for m in feature_maps]
        bottleneck = self.slice_size // 2 ** len(maps)

        enc: list[nn.Module] = []
        channels = 1
        for m in maps:
            enc += [nn.Conv2d(channels, m, 4, stride=2, padding=1), nn.LeakyReLU(negative_slope)]
            channels = m
        enc.append(nn.Conv2d(channels, 2 * self.latent_size, bottleneck))
        self.encoder = nn.Sequential(*enc)

        rev = maps[::-1]
        dec: list[nn.Module] = [nn.ConvTranspose2d(self.latent_size, rev[0], bottleneck), nn.LeakyReLU(negative_slope)]
        for i, m in enumerate(rev):
            out = rev[i + 1] if i + 1 < len(rev) else 1
            dec.append(nn.ConvTranspose2d(m, out, 4, stride=2, padding=1))
            if i + 1 < len(rev):
                dec.append(nn.LeakyReLU(negative_slope))
        self.decoder = nn.Sequential(*dec)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N,1,S,S) -> mean and log-variance of q(z|x), each (N, latent_size)."""
        h = self.encoder(x).flatten(1)
        mu, logvar = h.chunk(2, dim=1)
        return mu, logvar

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (N, latent_size) -> mean of p(x|z), (N,1,S,S)."""
        return self.decoder(z[:, :, None, None])

    @property
    def log_norm_const(self) -> float:
        """Per-pixel constant of the Gaussian negative log-likelihood: log c + log(2 pi)/2."""
        return math.log(self.likelihood_std) + 0.5 * math.log(2 * math.pi)
