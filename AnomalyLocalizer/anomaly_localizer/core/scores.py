"""Anomaly scores of the VAE family (Zimmerer et al. 2019), per slice and per pixel.

All losses use z = mean of q(z|x) (deterministic). For a slice x with reconstruction
x_hat = D(mu(x)) and a Gaussian likelihood of standard deviation c:

- rec (pixel):    (x - x_hat)^2 / (2 c^2)
- rec (slice):    sum over pixels of the Gaussian negative log-likelihood
- kl (slice):     KL(q(z|x) || N(0, I))
- elbo (slice):   rec + kl, i.e. the negative ELBO (higher is more anomalous)
- rec_grad, kl_grad, elbo_grad (pixel): |d term / d x|, smoothed with the paper's Gaussian
  (7x7, sigma 3 model pixels). The ELBO's gradient is the sum of the other two, so one
  forward pass and two backward passes give all three.
- combi (pixel):  smooth(minmax(|d kl / d x|)) * rec, the min-max taken over the brain of
  the whole volume (the reference code took it over a batch of slices).

:func:`raw_terms` works on any batch of slices; :func:`finalise_maps` needs every slice
of the volume, because of the per-volume normalisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .models import ConvVAE

PIXEL_METHODS = ("rec", "rec_grad", "kl_grad", "elbo_grad", "combi")
SLICE_SCORES = ("elbo", "kl", "rec")
# Which raw terms each method needs: gradients cost a backward pass each.
_NEEDS_REC_GRAD = {"rec_grad", "elbo_grad"}
_NEEDS_KL_GRAD = {"kl_grad", "elbo_grad", "combi"}
SMOOTH_KERNEL = 7
SMOOTH_SIGMA = 3.0


@dataclass
class RawTerms:
    """Per-batch results: pixel maps (N,S,S) and slice terms (N,)."""

    rec_pixel: torch.Tensor
    rec_slice: torch.Tensor
    kl_slice: torch.Tensor
    grad_rec: torch.Tensor | None
    grad_kl: torch.Tensor | None


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, 1)) summed over latent dimensions: (N,)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1.0).sum(dim=1)


def rec_nll(x: torch.Tensor, x_hat: torch.Tensor, model: ConvVAE) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian negative log-likelihood: per pixel without the constant (N,S,S), per slice with it (N,)."""
    c = model.likelihood_std
    pix = (x - x_hat).pow(2)[:, 0] / (2.0 * c * c)
    slice_nll = pix.flatten(1).sum(1) + pix[0].numel() * model.log_norm_const
    return pix, slice_nll


def raw_terms(model: ConvVAE, x: torch.Tensor, methods: tuple[str, ...] | list[str]) -> RawTerms:
    """Forward once and backward only for the gradients the methods need."""
    want_rec_grad = bool(_NEEDS_REC_GRAD & set(methods))
    want_kl_grad = bool(_NEEDS_KL_GRAD & set(methods))
    with torch.set_grad_enabled(want_rec_grad or want_kl_grad):
        x = x.detach().requires_grad_(want_rec_grad or want_kl_grad)
        mu, logvar = model.encode(x)
        x_hat = model.decode(mu)
        pix, rec_slice = rec_nll(x, x_hat, model)
        kl = kl_divergence(mu, logvar)
        grad_kl = grad_rec = None
        # Per-slice terms depend only on their own slice, so the gradient of the batch sum
        # is each slice's own gradient, independent of the batch size.
        if want_kl_grad:
            grad_kl = torch.autograd.grad(kl.sum(), x, retain_graph=want_rec_grad)[0][:, 0].detach()
        if want_rec_grad:
            grad_rec = torch.autograd.grad(rec_slice.sum(), x)[0][:, 0].detach()
    return RawTerms(rec_pixel=pix.detach(), rec_slice=rec_slice.detach(), kl_slice=kl.detach(),
                    grad_rec=grad_rec, grad_kl=grad_kl)


def smooth(maps: torch.Tensor, kernel_size: int = SMOOTH_KERNEL, sigma: float = SMOOTH_SIGMA) -> torch.Tensor:
    """The paper's 2D Gaussian smoothing of (N,S,S) maps, zero padding, kernel summing to 1."""
    ax = torch.arange(kernel_size, dtype=torch.float32, device=maps.device) - (kernel_size - 1) / 2.0
    k1 = torch.exp(-0.5 * (ax / sigma) ** 2)
    k1 = k1 / k1.sum()
    x = maps[:, None].float()
    x = F.conv2d(x, k1.view(1, 1, -1, 1), padding=(kernel_size // 2, 0))
    x = F.conv2d(x, k1.view(1, 1, 1, -1), padding=(0, kernel_size // 2))
    return x[:, 0]


def minmax_in_mask(maps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(maps - min) / (max - min), min and max over the masked pixels of the whole stack."""
    vals = maps[mask]
    if vals.numel() == 0:
        return torch.zeros_like(maps)
    lo, hi = vals.min(), vals.max()
    return (maps - lo) / (hi - lo) if hi > lo else torch.zeros_like(maps)


def finalise_maps(terms: RawTerms, mask: torch.Tensor, methods: tuple[str, ...] | list[str]) -> dict[str, torch.Tensor]:
    """Pixel maps (N,S,S) in model space for the whole volume; 0 outside the model-space mask."""
    out: dict[str, torch.Tensor] = {}
    abs_kl = terms.grad_kl.abs() if terms.grad_kl is not None else None
    for m in methods:
        if m == "rec":
            v = terms.rec_pixel
        elif m == "rec_grad":
            v = smooth(terms.grad_rec.abs())
        elif m == "kl_grad":
            v = smooth(abs_kl)
        elif m == "elbo_grad":
            v = smooth((terms.grad_rec + terms.grad_kl).abs())
        elif m == "combi":
            v = smooth(minmax_in_mask(abs_kl, mask)) * terms.rec_pixel
        else:
            raise ValueError(f"unknown method {m!r}")
        out[m] = torch.where(mask, v, torch.zeros_like(v))
    return out


def concat_terms(parts: list[RawTerms]) -> RawTerms:
    """Join per-batch results in order."""
    def cat(name: str):
        vals = [getattr(p, name) for p in parts]
        return None if vals[0] is None else torch.cat(vals)
    return RawTerms(*(cat(n) for n in ("rec_pixel", "rec_slice", "kl_slice", "grad_rec", "grad_kl")))
