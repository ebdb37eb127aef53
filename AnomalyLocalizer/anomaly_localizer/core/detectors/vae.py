"""The VAE family (Zimmerer et al. 2019; the ceVAE scores the same way) and restoration
with a normative prior (Chen et al. 2019), which optimises each slice under the same VAE.

Maps: the gradient-family scores of :mod:`anomaly_localizer.core.scores` from one forward
and two backward passes per batch of slices, and (opt-in) ``restoration``
(:mod:`anomaly_localizer.core.restoration`). Slice scores: -ELBO and its two terms.
"""

from __future__ import annotations

import logging
import time
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import Field, model_validator

from ..schema import Channels, Open, SliceSize, Strict
from .base import Detector, DetectorOutput, ScoringContext

log = logging.getLogger(__name__)

GRADIENT_METHODS = ("rec", "rec_grad", "kl_grad", "elbo_grad", "combi")


class VAEArchitecture(Strict):
    type: Literal["vae", "cevae"] = "vae"
    slice_size: SliceSize = 64
    feature_maps: Annotated[list[Channels], Field(min_length=1, max_length=8)] = [16, 32, 64, 256]
    latent_size: Annotated[int, Field(ge=1, le=8192)] = 256
    likelihood_std: Annotated[float, Field(gt=0.0, le=1000.0)] = 1.0

    @model_validator(mode="after")
    def _divisible(self) -> "VAEArchitecture":
        if self.slice_size % (2 ** len(self.feature_maps)):
            raise ValueError(f"slice_size {self.slice_size} is not divisible by 2**{len(self.feature_maps)} "
                             "(one halving per feature map)")
        return self


class RestorationSettings(Open):
    """The ``restoration`` block; keys left out take :data:`core.restoration.DEFAULT_RESTORATION`."""

    lambda_: Optional[Annotated[float, Field(gt=0.0, le=1000.0)]] = Field(None, alias="lambda")
    optimizer: Optional[Literal["adam", "gd"]] = None
    steps: Optional[Annotated[int, Field(ge=1, le=20000)]] = None
    learning_rate: Optional[Union[Annotated[float, Field(gt=0.0, le=10.0)], Annotated[
        list[Annotated[float, Field(gt=0.0, le=10.0)]], Field(min_length=1, max_length=2)]]] = None
    tolerance: Optional[Annotated[float, Field(ge=0.0, le=1.0)]] = None
    gradient_clip: Optional[Annotated[float, Field(gt=0.0, le=1e6)]] = None


class VAEDetector(Detector):
    name = "vae"
    order = 0
    types = ("vae", "cevae")
    methods = GRADIENT_METHODS + ("restoration",)
    opt_in = ("restoration",)
    method_help = {
        "rec": "reconstruction error (x - x_hat)^2 / 2c^2",
        "rec_grad": "|d rec / dx|, Gaussian-smoothed (7x7, sigma = 3 model pixels) as in the paper",
        "kl_grad": "|d KL / dx|, smoothed",
        "elbo_grad": "|d (rec + KL) / dx|, smoothed",
        "combi": "smoothed min-max-normalised KL-Grad times rec; normalised over the whole volume's brain",
        "restoration": "|y - x| where x restores the slice y: minimises -ELBO(x) + lambda TV(x - y) inside the brain "
                       "(Chen et al.); opt-in, seconds per volume",
    }
    slice_scores = ("elbo", "kl", "rec")
    volume_score_meaning = "mean negative ELBO of the 10 % most anomalous brain slices"
    architecture = VAEArchitecture
    settings = {"restoration": RestorationSettings}
    example_model = "a VAE model (e.g. brain-t1-vae)"

    def describe(self, meta: dict[str, Any]) -> list[str]:
        arch = meta["architecture"]
        training = meta.get("training", {})
        cfg = training.get("config", {})
        return [
            f"- Architecture: {arch['type'].upper()} (Zimmerer et al. 2019"
            f"{', context-encoding' if arch['type'] == 'cevae' else ''}),\n"
            f"  feature maps {arch['feature_maps']}, latent size {arch['latent_size']}, Gaussian likelihood "
            f"c = {arch['likelihood_std']:g}.",
            f"- Schedule: Adam, learning rate {cfg.get('learning_rate', '?')}, divided by 10 on a validation plateau, "
            f"early stop\n  after {cfg.get('early_stop_patience', '?')} epochs without improvement; best epoch "
            f"{training.get('best_epoch', '?')}\n  of {training.get('epochs_run', '?')}; batch {cfg.get('batch_size', '?')}; "
            f"augmentation: left-right flips, rotations\n  up to {cfg.get('rotate_deg', '?')} degrees, scaling "
            f"+-{cfg.get('scale_range', '?')}, brightness, noise."]

    def build_network(self, architecture: dict[str, Any]):
        from ..models.vae import ConvVAE
        arch = VAEArchitecture.model_validate(architecture)
        return ConvVAE(**arch.model_dump(exclude={"type"}))

    def score(self, net, prepared, package, methods: list[str], ctx: ScoringContext) -> DetectorOutput:
        from ..scores import finalise_maps
        grad_methods = [m for m in methods if m in GRADIENT_METHODS]
        restoring = "restoration" in methods
        # The gradient scores take a fraction of a second, a restoration most of the run.
        share = 0.25 if restoring else 1.0
        terms = compute_terms(net, prepared.slices, grad_methods, ctx.device, ctx.batch_size,
                              lambda f, msg: ctx.report(share * f, msg), ctx.cancel)
        maps = finalise_maps(terms, prepared.mask[:, 0], grad_methods)
        out = DetectorOutput(maps=maps, slice_scores={"elbo": terms.rec_slice + terms.kl_slice,
                                                      "kl": terms.kl_slice, "rec": terms.rec_slice})
        if restoring:
            from ..restoration import restoration_map
            t = time.perf_counter()
            n = prepared.slices.shape[0]
            # All slices of the volume in one batch: one optimisation, and small slices make it cheap.
            sub = lambda f: ctx.report(share + (1 - share) * f, f"restoring {n} slices")  # noqa: E731
            restored, record = restoration_map(net, prepared.slices.to(ctx.device), prepared.mask.to(ctx.device),
                                               package.settings("restoration"), ctx.cancel, sub)
            out.maps["restoration"] = restored.cpu()
            out.info["restoration"] = record
            out.timings["restoration_s"] = time.perf_counter() - t
        return out


def _bytes_per_slice(model, slice_size: int) -> int:
    """Rough activation memory of one slice for forward + two backward passes."""
    params = sum(p.numel() for p in model.parameters())
    widths = model.encoder[0].out_channels
    # first layer activations dominate; x4 bytes, x8 for stored activations and gradients
    return int(4 * 8 * (slice_size * slice_size * (1 + widths) + params / 64))


def compute_terms(model, slices, methods: list[str], device, batch_size: int | None = None, progress=None,
                  cancel=None):
    """Raw terms for all slices, in batches; on out-of-memory halve the batch and retry.
    ``progress(fraction, message)`` follows the slices scored."""
    import torch

    from ...errors import CancelledError, InputError
    from ..device import batch_size_for, is_out_of_memory
    from ..scores import RawTerms, concat_terms, raw_terms

    n = slices.shape[0]
    bs = batch_size or batch_size_for(device, _bytes_per_slice(model, slices.shape[-1]), max(n, 1))
    parts: list[RawTerms] = []
    start = 0
    while start < n:
        if cancel is not None and cancel():
            raise CancelledError("cancelled by the user")
        batch = slices[start:start + bs].to(device)
        try:
            t = raw_terms(model, batch, methods)
        except (RuntimeError, torch.cuda.OutOfMemoryError) as exc:
            if not is_out_of_memory(exc) or bs == 1:
                raise
            bs = max(1, bs // 2)
            log.warning("out of memory; retrying with batches of %d slices", bs)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        parts.append(RawTerms(*(None if v is None else v.cpu() for v in
                                (t.rec_pixel, t.rec_slice, t.kl_slice, t.grad_rec, t.grad_kl))))
        start += batch.shape[0]
        if progress is not None:
            progress(start / n, f"scored {start}/{n} slices")
    if not parts:
        raise InputError("no axial slice contains brain; check the brain mask")
    return concat_terms(parts)


DETECTOR = VAEDetector()
