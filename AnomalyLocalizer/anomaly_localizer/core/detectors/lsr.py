"""Latent space restoration (Naval Marimont & Tarroni 2021): a VQ-VAE and an autoregressive
prior over its codes (:mod:`anomaly_localizer.core.lsr` holds the method)."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional

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

    lambda_s: Optional[Annotated[float, Field(ge=0.0, le=1000.0)]] = None
    lambda_p: Optional[Annotated[float, Field(ge=0.0, le=1000.0)]] = None
    samples: Optional[Annotated[int, Field(ge=1, le=200)]] = None
    temperature: Optional[Annotated[float, Field(ge=0.0, le=1000.0)]] = None
    min_pool: Optional[Annotated[int, Field(ge=1, le=31)]] = None
    avg_pool: Optional[Annotated[int, Field(ge=1, le=63)]] = None
    seed: Optional[Annotated[int, Field(ge=0, le=2 ** 31)]] = None


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

    def describe(self, meta: dict[str, Any]) -> list[str]:
        arch = meta["architecture"]
        vq, pr = arch["vqvae"], arch["prior"]
        grid = arch["slice_size"] // 2 ** len(vq["feature_maps"])
        sc = meta.get("lsr", {})
        training = meta.get("training", {})
        cfg = training.get("config", {})
        tv, tp = training.get("vqvae", {}), training.get("prior", {})
        return [
            f"- Architecture: VQ-VAE (feature maps {vq['feature_maps']}, {vq['residual_blocks']} residual blocks, "
            f"codebook of {vq['codebook_size']} vectors of {vq['embedding_dim']}, code grid {grid}x{grid}; L1 "
            f"reconstruction, commitment {vq['commitment']:g}) and a PixelSNAIL-style autoregressive prior over its "
            f"codes ({pr['blocks']} gated residual blocks of {pr['channels']} channels, causal self-attention with "
            f"{pr['attention_heads']} heads), conditioned on the slice's position in the brain "
            "(Naval Marimont & Tarroni 2021).",
            f"- Scoring (`lsr` in `model.json`): slice score = sum of code NLLs above lambda_s = {sc.get('lambda_s')}; "
            f"pixel score from {sc.get('samples')} restorations resampling codes with NLL above lambda_p = "
            f"{sc.get('lambda_p')}, weighted with temperature k = {sc.get('temperature')}, "
            f"{sc.get('min_pool')}x{sc.get('min_pool')} min-pool, {sc.get('avg_pool')}x{sc.get('avg_pool')} "
            f"average-pool, seed {sc.get('seed')}.",
            f"- Schedule: Adam (VQ-VAE {cfg.get('vqvae_learning_rate')}, prior {cfg.get('prior_learning_rate')}), "
            f"divided by 10 on a validation plateau, early stop after {cfg.get('early_stop_patience')} epochs "
            f"without improvement; VQ-VAE best epoch {tv.get('best_epoch')} of {tv.get('epochs_run')} (validation L1 "
            f"{tv.get('best_val_loss', float('nan')):.4f}), prior best epoch {tp.get('best_epoch')} of "
            f"{tp.get('epochs_run')} (validation NLL {tp.get('best_val_loss', float('nan')):.3f} nats per code); "
            f"{training.get('codebook_entries_used', '?')} codebook entries in use; batch {cfg.get('batch_size')}; "
            "VQ-VAE augmentation as the VAE's, prior trained on the code grids and their mirror images."]

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
