"""``restoration``: restoration with a normative prior (Chen, You, Tezcan, Konukoglu 2019).

Each slice y is restored to the x that minimises

    L(x) = 2 c^2 * (-ELBO(x)) + lambda * TV(x - y)

inside the brain (pixels outside stay as they are), starting from x = y; the anomaly map
is |y - x|. -ELBO(x) is the VAE's negative ELBO with z = mean of q(z|x) (deterministic, so a
run is reproducible); the factor 2 c^2 turns its Gaussian term into the plain squared error
||x - x_hat||^2 of the reference implementation, so lambda and the step sizes mean what they
mean there. TV is the anisotropic total variation (sum of absolute neighbour differences).

Two optimisers:

- ``"gd"``, the reference: 500 steps of gradient descent, step 5e-3 for 100 steps then 2e-3,
  each gradient clipped to +-100;
- ``"adam"``, the default: Adam with a cosine-decaying step, at most ``steps`` steps, stopped
  early when the objective has stopped falling (relative change below ``tolerance`` over 5
  steps). All slices of a volume go in one batch.

Both reach the same restoration (``anomaly-localizer evaluate --method restoration`` with
either setting compares their scores; see README). lambda is chosen on healthy validation
scans without labels (:mod:`anomaly_localizer.tooling.release.tune_restoration`) and stored in the
package's model.json under ``restoration``.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from ..errors import CancelledError, InputError
from .scores import kl_divergence

DEFAULT_RESTORATION: dict[str, Any] = {
    "lambda": 0.3,
    "optimizer": "adam",
    "steps": 150,
    "learning_rate": 0.03,
    "tolerance": 1e-4,
}
REFERENCE_RESTORATION: dict[str, Any] = {
    "optimizer": "gd",
    "steps": 500,
    "learning_rate": [5e-3, 2e-3],  # first 100 steps, then the rest
    "gradient_clip": 100.0,
}


def total_variation(d: torch.Tensor) -> torch.Tensor:
    """Anisotropic TV of (N,1,S,S) images: (N,)."""
    dv = (d[:, :, 1:] - d[:, :, :-1]).abs().flatten(1).sum(1)
    dh = (d[:, :, :, 1:] - d[:, :, :, :-1]).abs().flatten(1).sum(1)
    return dv + dh


def objective(model, x: torch.Tensor, y: torch.Tensor, lam: float) -> torch.Tensor:
    """Per-slice restoration objective (N,): squared-error ELBO term plus lambda TV(x - y)."""
    mu, logvar = model.encode(x)
    x_hat = model.decode(mu)
    c2 = model.likelihood_std ** 2
    neg_elbo = (x - x_hat).pow(2).flatten(1).sum(1) + 2 * c2 * kl_divergence(mu, logvar)
    return neg_elbo + lam * total_variation(x - y)


def restore(model, y: torch.Tensor, mask: torch.Tensor, params: dict[str, Any] | None = None,
            cancel: Callable[[], bool] | None = None,
            progress: Callable[[float], None] | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """Restore slices y (N,1,S,S) inside ``mask`` (N,1,S,S) bool. Returns x and a record of
    the optimisation (steps taken, final objective)."""
    p = {**DEFAULT_RESTORATION, **(params or {})}
    flags = [q.requires_grad for q in model.parameters()]
    for q in model.parameters():  # gradients with respect to the image only
        q.requires_grad_(False)
    try:
        return _restore(model, y, mask, p, cancel, progress)
    finally:
        for q, f in zip(model.parameters(), flags):
            q.requires_grad_(f)


def _restore(model, y: torch.Tensor, mask: torch.Tensor, p: dict[str, Any], cancel: Callable[[], bool] | None,
             progress: Callable[[float], None] | None) -> tuple[torch.Tensor, dict[str, Any]]:
    lam = float(p["lambda"])
    m = mask.to(y.dtype)
    x = y.detach().clone().requires_grad_(True)
    steps = int(p["steps"])
    history: list[float] = []
    taken = 0
    if p["optimizer"] == "gd":
        rates = p["learning_rate"] if isinstance(p["learning_rate"], (list, tuple)) else [p["learning_rate"]] * 2
        clip = float(p.get("gradient_clip", REFERENCE_RESTORATION["gradient_clip"]))
        for step in range(steps):
            if cancel is not None and cancel():
                raise CancelledError("cancelled by the user")
            if progress is not None and step % 10 == 0:
                progress(step / steps)
            loss = objective(model, x, y, lam)
            (g,) = torch.autograd.grad(loss.sum(), x)
            with torch.no_grad():
                x -= (rates[0] if step < 100 else rates[1]) * g.clamp(-clip, clip) * m
            history.append(float(loss.detach().sum()))
            taken = step + 1
    elif p["optimizer"] == "adam":
        opt = torch.optim.Adam([x], lr=float(p["learning_rate"]))
        lr0 = float(p["learning_rate"])
        tol = float(p["tolerance"])
        for step in range(steps):
            if cancel is not None and cancel():
                raise CancelledError("cancelled by the user")
            if progress is not None and step % 10 == 0:
                progress(step / steps)  # an upper bound on the time left: the run may stop early
            for group in opt.param_groups:  # cosine decay: large steps first, a settled end
                group["lr"] = lr0 * 0.5 * (1 + math.cos(math.pi * step / steps))
            loss = objective(model, x, y, lam)
            opt.zero_grad(set_to_none=True)
            loss.sum().backward()
            x.grad *= m
            opt.step()
            history.append(float(loss.detach().sum()))
            taken = step + 1
            if step >= 10 and abs(history[-6] - history[-1]) <= tol * abs(history[-1]):
                break
    else:
        raise InputError(f"unknown restoration optimizer {p['optimizer']!r} in the model's restoration settings; "
                         "use 'adam' or 'gd' (model.json, key restoration.optimizer)")
    with torch.no_grad():
        x = torch.where(mask, x, y)
        final = float(objective(model, x, y, lam).sum())
    return x.detach(), {"steps": taken, "objective": final, "lambda": lam, "optimizer": p["optimizer"]}


def restoration_map(model, y: torch.Tensor, mask: torch.Tensor, params: dict[str, Any] | None = None,
                    cancel: Callable[[], bool] | None = None,
                    progress: Callable[[float], None] | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """|y - restored y| (N,S,S), 0 outside the mask."""
    x, record = restore(model, y, mask, params, cancel, progress)
    return ((y - x).abs() * mask)[:, 0], record
