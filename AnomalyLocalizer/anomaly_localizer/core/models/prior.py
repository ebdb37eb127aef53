"""An autoregressive prior over a VQ-VAE's code grid, conditioned on the slice's position.

PixelSNAIL-style (Chen et al. 2018), as the LSR paper used: two causal streams of gated
residual blocks with shifted convolutions (PixelCNN++, Salimans et al. 2017) so there is no
blind spot, and causal self-attention over the whole grid so a code sees all earlier
codes, not just a neighbourhood. Raster order: the logits at (r, c) depend only on codes
at earlier rows, or the same row and earlier columns.

Causality also means the logits of rows 0..r do not depend on rows below r, which
:mod:`anomaly_localizer.lsr` uses to run the prior on a grid cropped below the row being
resampled.

Conditioning: the slice's relative position in the brain (0 = lowest brain slice,
1 = highest) enters every block as a learned bias of Fourier features.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_PRIOR: dict[str, Any] = {
    "channels": 64,
    "blocks": 4,
    "attention_heads": 4,
    "dropout": 0.1,
    "position_frequencies": 4,
}


def down_shift(x: torch.Tensor) -> torch.Tensor:
    return F.pad(x, (0, 0, 1, 0))[:, :, :-1]


def right_shift(x: torch.Tensor) -> torch.Tensor:
    return F.pad(x, (1, 0, 0, 0))[:, :, :, :-1]


class DownShiftedConv(nn.Module):
    """Output (r, c) sees rows r-kh+1..r and columns c-kw//2..c+kw//2."""

    def __init__(self, cin: int, cout: int, kernel: tuple[int, int] = (2, 3)):
        super().__init__()
        self.kh, self.kw = kernel
        self.conv = nn.Conv2d(cin, cout, kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (self.kw // 2, self.kw // 2, self.kh - 1, 0)))


class DownRightShiftedConv(nn.Module):
    """Output (r, c) sees rows r-kh+1..r and columns c-kw+1..c."""

    def __init__(self, cin: int, cout: int, kernel: tuple[int, int] = (2, 2)):
        super().__init__()
        self.kh, self.kw = kernel
        self.conv = nn.Conv2d(cin, cout, kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (self.kw - 1, 0, self.kh - 1, 0)))


class GatedResidual(nn.Module):
    """x + a * sigmoid(b), [a, b] = conv(elu(conv(elu(x)) + nin(elu(aux)))) + condition bias."""

    def __init__(self, channels: int, conv_type: type, dropout: float, aux: bool):
        super().__init__()
        self.conv_in = conv_type(channels, channels)
        self.aux = nn.Conv2d(channels, channels, 1) if aux else None
        self.drop = nn.Dropout(dropout)
        self.conv_out = conv_type(channels, 2 * channels)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, aux: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv_in(F.elu(x))
        if self.aux is not None and aux is not None:
            h = h + self.aux(F.elu(aux))
        h = self.conv_out(self.drop(F.elu(h))) + cond[:, :, None, None]
        a, b = h.chunk(2, dim=1)
        return x + a * torch.sigmoid(b)


class CausalAttention(nn.Module):
    """Self-attention over raster positions; position t attends to s <= t (the features at s
    already depend only on codes before s, so including t itself stays causal)."""

    def __init__(self, channels: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, pos_emb: torch.Tensor) -> torch.Tensor:
        n, ch, h, w = x.shape
        q, k, v = self.qkv(F.elu(x) + pos_emb[:, :, :h, :w]).chunk(3, dim=1)
        split = lambda t: t.reshape(n, self.heads, ch // self.heads, h * w).transpose(2, 3)
        att = F.scaled_dot_product_attention(split(q), split(k), split(v), is_causal=True)
        return x + self.out(att.transpose(2, 3).reshape(n, ch, h, w))


class CodePrior(nn.Module):
    """p(code grid | slice position) = prod over raster positions of p(code_t | codes_<t, position)."""

    def __init__(self, codebook_size: int, grid_size: int, channels: int = 64, blocks: int = 4,
                 attention_heads: int = 4, dropout: float = 0.1, position_frequencies: int = 4, **_: Any):
        super().__init__()
        if channels % attention_heads:
            raise ValueError("channels must be divisible by attention_heads")
        self.codebook_size = int(codebook_size)
        self.grid_size = int(grid_size)
        self.frequencies = int(position_frequencies)
        self.embed = nn.Embedding(self.codebook_size, channels)
        self.u_in = DownShiftedConv(channels, channels, (2, 3))
        self.ul_in_up = DownShiftedConv(channels, channels, (1, 3))
        self.ul_in_left = DownRightShiftedConv(channels, channels, (2, 1))
        self.u_blocks = nn.ModuleList(GatedResidual(channels, DownShiftedConv, dropout, aux=False) for _ in range(blocks))
        self.ul_blocks = nn.ModuleList(GatedResidual(channels, DownRightShiftedConv, dropout, aux=True)
                                       for _ in range(blocks))
        self.attention = CausalAttention(channels, attention_heads)
        # Learned grid-position embedding for the attention (convolutions know where they are
        # only through padding).
        self.grid_embedding = nn.Parameter(torch.zeros(1, channels, self.grid_size, self.grid_size))
        self.condition = nn.Linear(1 + 2 * self.frequencies, 2 * blocks * 2 * channels)
        self.head = nn.Conv2d(channels, self.codebook_size, 1)
        self.blocks = blocks
        self.channels = channels

    def _position_features(self, position: torch.Tensor) -> torch.Tensor:
        p = position.float().view(-1, 1)
        k = torch.arange(1, self.frequencies + 1, device=p.device, dtype=p.dtype)[None] * math.pi
        return torch.cat([p, torch.sin(k * p), torch.cos(k * p)], dim=1)

    def forward(self, codes: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """codes (N,H,W) int64 with H <= grid_size, position (N,) in [0, 1] -> logits (N,K,H,W)."""
        e = self.embed(codes).permute(0, 3, 1, 2)
        conds = self.condition(self._position_features(position)).chunk(2 * self.blocks, dim=1)
        u = down_shift(self.u_in(e))
        ul = down_shift(self.ul_in_up(e)) + right_shift(self.ul_in_left(e))
        for i in range(self.blocks):
            u = self.u_blocks[i](u, conds[2 * i])
            ul = self.ul_blocks[i](ul, conds[2 * i + 1], aux=u)
        ul = self.attention(ul, self.grid_embedding)
        return self.head(F.elu(ul))

    def nll(self, codes: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood of every code given the codes before it: (N,H,W), in nats."""
        return F.cross_entropy(self(codes, position), codes, reduction="none")
