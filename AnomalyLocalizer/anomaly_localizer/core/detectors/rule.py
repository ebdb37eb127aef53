"""The intensity rule: how much brighter (or darker) than the brain's median each voxel is.

Meissen et al. (2021, "Challenging current semi-supervised anomaly segmentation methods for
brain MRI") showed that on FLAIR, where lesions are bright, voxels brighter than the brain's
median, in units of its spread, smoothed, beat most learned detectors. It has no notion of
anatomy: on a healthy FLAIR it flags the cortex, the septum, the choroid plexus and the
periventricular caps as readily as a lesion; a map that knows anatomy must beat it. It is
shipped as a model of its own (calibrated like any map, on healthy scans or renderings of
its contrast) so that it is the baseline in every table and a component of fused maps.

Pixel score ``rule``: in model space, where every volume is normalised inside its brain
(median 0.5, inter-quartile range 0.25, :mod:`..volume`), (x - 0.5) / 0.25 kept where
positive (``direction`` "bright"; "dark": its negative; "both": its magnitude), smoothed by
a Gaussian of ``smoothing_px`` model pixels; 0 outside the brain. Slice score ``rule``: the
mean of the slice's ``slice_top_k`` highest pixel scores. No network, no weights.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from ..schema import SliceSize, Strict
from .base import Detector, DetectorOutput, ScoringContext


class RuleArchitecture(Strict):
    type: Literal["intensity-rule"] = "intensity-rule"
    slice_size: SliceSize = 112
    direction: Literal["bright", "dark", "both"] = "bright"
    smoothing_px: Annotated[float, Field(ge=0.0, le=5.0)] = 1.0
    slice_top_k: Annotated[int, Field(ge=1, le=10000)] = 20


class RuleDetector(Detector):
    name = "rule"
    order = 90  # after the learned detectors in listings
    types = ("intensity-rule",)
    methods = ("rule",)
    has_weights = False
    method_help = {"rule": "the intensity rule (Meissen et al. 2021): how far above the brain's median each voxel "
                           "is, in units of its inter-quartile range, smoothed; the baseline a map must beat"}
    slice_scores = ("rule",)
    volume_score_meaning = "mean rule slice score (its top pixel scores) of the 10 % most anomalous brain slices"
    architecture = RuleArchitecture
    example_model = "an intensity rule model (e.g. brain-flair-rule)"

    def describe(self, meta: dict[str, Any]) -> list[str]:
        a = RuleArchitecture.model_validate(meta["architecture"])
        sign = {"bright": "(x - median) / IQR where positive", "dark": "(median - x) / IQR where positive",
                "both": "|x - median| / IQR"}[a.direction]
        return [f"- No network: {sign} inside the brain (Meissen et al. 2021), on {a.slice_size}x{a.slice_size} "
                f"model slices, smoothed by a Gaussian of {a.smoothing_px:g} pixels; slice score = mean of the "
                f"slice's {a.slice_top_k} highest pixel scores."]

    def build_network(self, architecture: dict[str, Any]):
        return None

    def score(self, net, prepared, package, methods: list[str], ctx: ScoringContext) -> DetectorOutput:
        from .dae import top_k_mean
        a = RuleArchitecture.model_validate(package.architecture)
        norm = package.contract.normalisation
        z = (prepared.slices[:, 0] - norm.median_to) / norm.iqr_to
        z = {"bright": z.clamp_min(0), "dark": (-z).clamp_min(0), "both": z.abs()}[a.direction]
        z = gaussian_blur(z, a.smoothing_px) * prepared.mask[:, 0]
        ctx.report(1.0, f"rule on {z.shape[0]} slices")
        return DetectorOutput(maps={"rule": z}, slice_scores={"rule": top_k_mean(z, a.slice_top_k)})


def gaussian_blur(maps, sigma: float):
    """(N,S,S) maps smoothed in-plane by a Gaussian of ``sigma`` pixels (reflected borders)."""
    import torch
    import torch.nn.functional as F
    if sigma <= 0:
        return maps
    radius = max(1, int(round(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=maps.dtype)
    g = torch.exp(-t ** 2 / (2 * sigma ** 2))
    g = (g / g.sum()).to(maps.device)
    a = F.pad(maps[:, None], (radius, radius, radius, radius), mode="reflect")
    a = F.conv2d(a, g.view(1, 1, 1, -1))
    return F.conv2d(a, g.view(1, 1, -1, 1))[:, 0]


DETECTOR = RuleDetector()
