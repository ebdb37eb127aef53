"""A 2D U-Net on axial slices: brain extraction (one logit per pixel) and the denoising
autoencoder of :mod:`anomaly_localizer.core.detectors.dae` (the middle slice, restored) and the
tissue segmenter of :mod:`anomaly_localizer.core.detectors.anatomy` (``out_channels`` logits).

``in_channels`` > 1 takes neighbouring slices as channels (2.5D). ``norm`` is "batch"
(brain extraction, as trained) or "group" (GroupNorm: independent of the batch, so a slice
scores the same alone or with others).
"""

from __future__ import annotations

import torch
from torch import nn


def _norm(kind: str, channels: int, groups: int) -> nn.Module:
    if kind == "group":
        return nn.GroupNorm(min(groups, channels), channels)
    return nn.BatchNorm2d(channels)


def _block(cin: int, cout: int, norm: str = "batch", groups: int = 8) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), _norm(norm, cout, groups), nn.LeakyReLU(0.01),
                         nn.Conv2d(cout, cout, 3, padding=1), _norm(norm, cout, groups), nn.LeakyReLU(0.01))


class UNet2D(nn.Module):
    """U-Net with ``len(feature_maps)`` resolution levels; slice_size must divide by 2**(levels-1)."""

    def __init__(self, slice_size: int = 128, feature_maps=(16, 32, 64, 128), in_channels: int = 1,
                 norm: str = "batch", groups: int = 8, out_channels: int = 1, **_):
        super().__init__()
        self.slice_size = int(slice_size)
        maps = [int(m) for m in feature_maps]
        self.down = nn.ModuleList()
        cin = int(in_channels)
        for m in maps:
            self.down.append(_block(cin, m, norm, groups))
            cin = m
        self.up = nn.ModuleList()
        self.merge = nn.ModuleList()
        for m_hi, m_lo in zip(maps[-2::-1], maps[:0:-1]):
            self.up.append(nn.ConvTranspose2d(m_lo, m_hi, 2, stride=2))
            self.merge.append(_block(2 * m_hi, m_hi, norm, groups))
        self.head = nn.Conv2d(maps[0], int(out_channels), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N,C,S,S) -> (N,out_channels,S,S): brain logits, the restored middle slice, or tissue logits."""
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else nn.functional.max_pool2d(x, 2))
            skips.append(x)
        x = skips.pop()
        for up, merge in zip(self.up, self.merge):
            x = merge(torch.cat([up(x), skips.pop()], dim=1))
        return self.head(x)


class FoldEnsemble(nn.Module):
    """Networks of one architecture trained on different folds (for the self-supervised
    detector: different task families, each fold's checkpoint chosen on the families it held
    out). Weights are stored as ``folds.<i>.<name>``. ``forward`` returns the mean logit;
    scoring code that wants each fold on its own (e.g. to mirror every other fold's input)
    iterates :attr:`folds`."""

    def __init__(self, nets: list[nn.Module]):
        super().__init__()
        self.folds = nn.ModuleList(nets)

    def forward(self, x):
        return sum(net(x) for net in self.folds) / len(self.folds)
