"""A small 2D U-Net for brain extraction on axial slices (one logit per pixel: brain)."""

from __future__ import annotations

import torch
from torch import nn


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.LeakyReLU(0.01),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.LeakyReLU(0.01))


class UNet2D(nn.Module):
    """U-Net with ``len(feature_maps)`` resolution levels; slice_size must divide by 2**(levels-1)."""

    def __init__(self, slice_size: int = 128, feature_maps=(16, 32, 64, 128), **_):
        super().__init__()
        self.slice_size = int(slice_size)
        maps = [int(m) for m in feature_maps]
        self.down = nn.ModuleList()
        cin = 1
        for m in maps:
            self.down.append(_block(cin, m))
            cin = m
        self.up = nn.ModuleList()
        self.merge = nn.ModuleList()
        for m_hi, m_lo in zip(maps[-2::-1], maps[:0:-1]):
            self.up.append(nn.ConvTranspose2d(m_lo, m_hi, 2, stride=2))
            self.merge.append(_block(2 * m_hi, m_hi))
        self.head = nn.Conv2d(maps[0], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N,1,S,S) -> brain logits (N,1,S,S)."""
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else nn.functional.max_pool2d(x, 2))
            skips.append(x)
        x = skips.pop()
        for up, merge in zip(self.up, self.merge):
            x = merge(torch.cat([up(x), skips.pop()], dim=1))
        return self.head(x)
