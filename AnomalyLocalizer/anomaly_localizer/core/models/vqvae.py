"""The VQ-VAE of latent space restoration (Naval Marimont & Tarroni 2021).

An encoder of strided 4x4 convolutions (one halving per entry of ``feature_maps``) and
residual blocks maps a slice to a grid of ``embedding_dim``-vectors; each is replaced by
its nearest entry of a codebook of ``codebook_size`` vectors; a mirrored decoder maps the
quantised grid back to a slice. Training minimises the L1 reconstruction error plus the
codebook term ||sg[z_e] - e||^2 and ``commitment`` times ||z_e - sg[e]||^2, with the
straight-through gradient through the quantiser (van den Oord et al. 2017).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_VQVAE: dict[str, Any] = {
    "slice_size": 64,
    "feature_maps": [32, 64],
    "residual_blocks": 2,
    "embedding_dim": 64,
    "codebook_size": 128,
    "commitment": 0.25,
}


class _Residual(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class VQVAE(nn.Module):
    """2D VQ-VAE on single-channel slices of side ``slice_size``; code grid side
    ``slice_size / 2**len(feature_maps)``."""

    def __init__(self, slice_size: int = 64, feature_maps: list[int] | tuple[int, ...] = (32, 64),
                 residual_blocks: int = 2, embedding_dim: int = 64, codebook_size: int = 128,
                 commitment: float = 0.25, **_: Any):
        super().__init__()
        maps = [int(m) for m in feature_maps]
        if not maps or slice_size % (2 ** len(maps)):
            raise ValueError(f"slice_size {slice_size} is not divisible by 2**{len(maps)} (one halving per feature map)")
        self.slice_size = int(slice_size)
        self.grid_size = self.slice_size // 2 ** len(maps)
        self.codebook_size = int(codebook_size)
        self.commitment = float(commitment)
        enc: list[nn.Module] = []
        ch = 1
        for i, m in enumerate(maps):
            enc.append(nn.Conv2d(ch, m, 4, stride=2, padding=1))
            if i + 1 < len(maps):
                enc.append(nn.ReLU())
            ch = m
        enc += [_Residual(ch) for _ in range(residual_blocks)]
        enc += [nn.ReLU(), nn.Conv2d(ch, embedding_dim, 1)]
        self.encoder = nn.Sequential(*enc)
        self.codebook = nn.Embedding(self.codebook_size, embedding_dim)
        nn.init.uniform_(self.codebook.weight, -1.0 / self.codebook_size, 1.0 / self.codebook_size)
        dec: list[nn.Module] = [nn.Conv2d(embedding_dim, ch, 3, padding=1)]
        dec += [_Residual(ch) for _ in range(residual_blocks)]
        dec.append(nn.ReLU())
        rev = maps[::-1]
        for i, m in enumerate(rev):
            out = rev[i + 1] if i + 1 < len(rev) else 1
            dec.append(nn.ConvTranspose2d(m, out, 4, stride=2, padding=1))
            if i + 1 < len(rev):
                dec.append(nn.ReLU())
        self.decoder = nn.Sequential(*dec)

    def encode_continuous(self, x: torch.Tensor) -> torch.Tensor:
        """x (N,1,S,S) -> z_e (N,D,G,G)."""
        return self.encoder(x)

    def quantise(self, z_e: torch.Tensor) -> torch.Tensor:
        """Nearest codebook entry of every grid vector: (N,G,G) int64 codes."""
        flat = z_e.permute(0, 2, 3, 1).reshape(-1, z_e.shape[1])
        book = self.codebook.weight
        dist = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ book.t() + book.pow(2).sum(1)[None]
        return dist.argmin(1).view(z_e.shape[0], z_e.shape[2], z_e.shape[3])

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x (N,1,S,S) -> codes (N,G,G)."""
        return self.quantise(self.encode_continuous(x))

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (N,G,G) -> quantised grid (N,D,G,G)."""
        return self.codebook(codes).permute(0, 3, 1, 2)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (N,G,G) -> slices (N,1,S,S)."""
        return self.decoder(self.embed(codes))

    def loss(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training loss and its L1 and codebook/commitment parts (means over the batch)."""
        z_e = self.encode_continuous(x)
        codes = self.quantise(z_e.detach())
        z_q = self.embed(codes)
        codebook = F.mse_loss(z_q, z_e.detach())
        commit = F.mse_loss(z_e, z_q.detach())
        x_hat = self.decoder(z_e + (z_q - z_e).detach())  # straight-through estimator
        l1 = (x_hat - x).abs().mean()
        vq = codebook + self.commitment * commit
        return l1 + vq, l1, vq
