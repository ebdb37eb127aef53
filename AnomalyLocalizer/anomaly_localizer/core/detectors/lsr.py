"""Latent space restoration (Naval Marimont & Tarroni 2021): a VQ-VAE and an autoregressive
prior over its codes (:mod:`anomaly_localizer.core.lsr` holds the method)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from ..schema import Channels, SliceSize, Strict
from .base import Detector, DetectorOutput, ScoringContext


class VQVAEBlock(Strict):
    feature_maps: Annotated[list[Channels], Field(min_length=1, max_length=6)] = [32, 64]
    residual_blocks: Annotated[int, Field(ge=0, le=16)] = 2
    embedding_dim: Channels = 64
    codebook_size: Annotated[int, Field(ge=2, le=65536)] = 128
    commitment: Annotated[float, Field(ge=0.0, le=10.0)] = 0.25


class PriorBlock(Strict):
    channels: Channels = 64
    blocks: Annotated[int, Field(ge=1, le=32)] = 4
    attention_heads: Annotated[int, Field(ge=1, le=32)] = 4
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1
    position_frequencies: Annotated[int, Field(ge=0, le=64)] = 4


class LSRArchitecture(Strict):
    type: Literal["vqvae-lsr"] = "vqvae-lsr"
    slice_size: SliceSize = 64
    vqvae: VQVAEBlock = VQVAEBlock()
    prior: PriorBlock = PriorBlock()


class LSRScoring(Strict):
    """The ``lsr`` block: the paper's thresholds, samples and pooling."""

    lambda_s: Annotated[float, Field(ge=0.0, le=1000.0)] | None = None
    lambda_p: Annotated[float, Field(ge=0.0, le=1000.0)] | None = None
    samples: Annotated[int, Field(ge=1, le=200)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=1000.0)] | None = None
    min_pool: Annotated[int, Field(ge=1, le=31)] | None = None
    avg_pool: Annotated[int, Field(ge=1, le=63)] | None = None
    seed: Annotated[int, Field(ge=0, le=2 ** 31)] | None = None


class LSRDetector(Detector):
    name = "lsr"
    order = 10
    types = ("vqvae-lsr",)
    methods = ("lsr",)
    method_help = {"lsr": "latent space restoration: codes the prior finds unlikely are resampled 15 times, decoded, "
                          "residuals weighted and pooled (Naval Marimont & Tarroni)"}
    slice_scores = ("lsr",)
    volume_score_meaning = "mean lsr slice score (sum of unlikely code NLLs) of the 10 % most anomalous brain slices"
    architecture = LSRArchitecture
    settings = {"lsr": LSRScoring}
    example_model = "an LSR model (e.g. brain-t1-lsr)"

    def build_network(self, architecture: dict[str, Any]):
        from ..models.lsr import build_lsr
        return build_lsr(LSRArchitecture.model_validate(architecture).model_dump())

    def score(self, net, prepared, package, methods: list[str], ctx: ScoringContext) -> DetectorOutput:
        from ..lsr import DEFAULT_LSR_SCORING, lsr_scores
        params = {**DEFAULT_LSR_SCORING, **package.settings("lsr")}
        dev = ctx.device
        res = lsr_scores(net, prepared.slices.to(dev), prepared.mask.to(dev), prepared.slice_positions().to(dev),
                         params, ctx.report, ctx.cancel)
        return DetectorOutput(maps={"lsr": res.pixel.cpu()}, slice_scores={"lsr": res.slice},
                              info={"lsr": {"resampled_codes": res.resampled_codes, "prior_passes": res.prior_passes}})


DETECTOR = LSRDetector()
