"""``lsr``: latent space restoration (Naval Marimont & Tarroni, ISBI 2021).

For each slice, the VQ-VAE gives a grid of codes and the prior the negative log-likelihood
(NLL, nats) of every code given the codes before it and the slice's position in the brain.

- Slice score: the sum of the code NLLs above ``lambda_s``.
- Pixel score: ``samples`` restorations of the code grid, each resampling the codes whose
  NLL exceeds ``lambda_p`` from the prior, in raster order, so every resampled code is
  drawn given the codes already restored before it; the restorations are decoded and
  their absolute residuals to the input averaged with weights softmax(k / mean residual)
  (restorations closer to the input count more); then a ``min_pool`` min-pool (removes
  isolated pixels) and an ``avg_pool`` average-pool, per slice.

Work is spent only where codes are unlikely: the prior runs once over all grids to find
them, then once per raster position that some grid needs to resample, on those grids only
and on the rows down to that position (the prior is causal, so rows below cannot matter).

Residuals are measured in units of the brain's robust standard deviation (IQR / 1.349 of the
normalised intensities), the reference's z-score units, so the paper's temperature k keeps
its meaning. Sampling uses a generator seeded from ``seed``: a run is reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..errors import CancelledError
from .volume import NORMALISATION

# The paper's settings (Naval Marimont & Tarroni 2021), stored in the package and read from the
# package's "lsr" block.
DEFAULT_LSR_SCORING: dict[str, Any] = {
    "lambda_s": 7.0,  # slice score: sum of code NLLs above this (nats)
    "lambda_p": 5.0,  # pixel score: codes with NLL above this are resampled
    "samples": 15,  # restorations per slice
    "temperature": 3.0,  # k of the softmax weighting of restorations
    "min_pool": 3,
    "avg_pool": 7,
    "seed": 0,
}

RESIDUAL_UNIT = NORMALISATION["iqr_to"] / 1.349  # a normal distribution's IQR is 1.349 standard deviations
CHUNK_SLICES = 32  # slices restored together; fixed, so the random draws do not depend on memory


@dataclass
class LSRResult:
    pixel: torch.Tensor  # (N,S,S)
    slice: torch.Tensor  # (N,)
    nll: torch.Tensor  # (N,G,G)
    resampled_codes: int
    prior_passes: int


def code_nll(model, slices: torch.Tensor, positions: torch.Tensor, batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (N,G,G) and their NLLs under the prior (N,G,G)."""
    codes, nll = [], []
    with torch.no_grad():
        for s in range(0, slices.shape[0], batch):
            c = model.vqvae.encode(slices[s:s + batch])
            codes.append(c)
            nll.append(model.prior.nll(c, positions[s:s + batch]))
    return torch.cat(codes), torch.cat(nll)


def slice_score(nll: torch.Tensor, lambda_s: float) -> torch.Tensor:
    """Sum of the code NLLs above lambda_s, per slice (N,)."""
    return (nll * (nll > lambda_s)).flatten(1).sum(1)


def resample(prior, grids: torch.Tensor, positions: torch.Tensor, flags: torch.Tensor,
             gen: torch.Generator) -> tuple[torch.Tensor, int]:
    """Resample the flagged codes of ``grids`` (M,G,G) in raster order. Returns the new grids
    and the number of prior passes."""
    grids = grids.clone()
    G = grids.shape[-1]
    needed = torch.nonzero(flags.flatten(1).any(0)).flatten().tolist()
    with torch.no_grad():
        for t in needed:
            r, c = divmod(t, G)
            rows = torch.nonzero(flags[:, r, c]).flatten()
            logits = prior(grids[rows, :r + 1], positions[rows])[:, :, r, c]
            # drawn on the CPU in float64 (which MPS lacks) from a CPU generator: every device draws the same codes
            probs = F.softmax(logits.float().cpu().double(), dim=1)
            grids[rows, r, c] = torch.multinomial(probs, 1, generator=gen).flatten().to(grids.device)
    return grids, len(needed)


def weighted_residual(y: torch.Tensor, restored: torch.Tensor, temperature: float) -> torch.Tensor:
    """y (n,1,S,S), restored (n,k,S,S) -> (n,S,S): residuals weighted by softmax(k / mean residual)."""
    resid = (y - restored).abs() / RESIDUAL_UNIT
    mean = resid.mean(dim=(2, 3), keepdim=True).clamp_min(1e-6)
    w = torch.softmax(temperature / mean, dim=1)
    return (resid * w).sum(1) * RESIDUAL_UNIT


def pool(maps: torch.Tensor, min_pool: int, avg_pool: int) -> torch.Tensor:
    """Min-pool then average-pool (N,S,S) maps, stride 1, same size."""
    x = maps[:, None]
    if min_pool > 1:
        x = -F.max_pool2d(-x, min_pool, stride=1, padding=min_pool // 2)
    if avg_pool > 1:
        x = F.avg_pool2d(x, avg_pool, stride=1, padding=avg_pool // 2, count_include_pad=False)
    return x[:, 0]


def lsr_scores(model, slices: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, params: dict[str, Any],
               progress: Callable[[float, str], None] | None = None,
               cancel: Callable[[], bool] | None = None) -> LSRResult:
    """Slice and pixel scores of model slices (N,1,S,S) at ``positions`` (N,) in the brain."""
    k = int(params["samples"])
    codes, nll = code_nll(model, slices, positions)
    scores = slice_score(nll, float(params["lambda_s"]))
    flagged = nll > float(params["lambda_p"])
    pixel = torch.zeros(slices.shape[0], slices.shape[-2], slices.shape[-1], device=slices.device)
    passes = 0
    n = slices.shape[0]
    for chunk, s in enumerate(range(0, n, CHUNK_SLICES)):
        if cancel is not None and cancel():
            raise CancelledError("cancelled by the user")
        e = min(n, s + CHUNK_SLICES)
        gen = torch.Generator().manual_seed(int(params["seed"]) * 1000003 + chunk)  # a CPU stream (:func:`resample`)
        grids = codes[s:e].repeat_interleave(k, 0)
        pos = positions[s:e].repeat_interleave(k, 0)
        flags = flagged[s:e].repeat_interleave(k, 0)
        grids, p = resample(model.prior, grids, pos, flags, gen)
        passes += p
        with torch.no_grad():
            restored = model.vqvae.decode(grids).view(e - s, k, slices.shape[-2], slices.shape[-1])
        pixel[s:e] = weighted_residual(slices[s:e], restored, float(params["temperature"]))
        if progress is not None:
            progress(e / n, f"restored {e}/{n} slices")
    pixel = pool(pixel, int(params["min_pool"]), int(params["avg_pool"])) * mask[:, 0]
    return LSRResult(pixel=pixel, slice=scores, nll=nll, resampled_codes=int(flagged.sum()) * k, prior_passes=passes)
