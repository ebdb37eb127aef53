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
scans without labels (:func:`choose_lambda`) and stored in the package's model.json under
``restoration``.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from .errors import CancelledError, InputError
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
LAMBDA_GRID = (0.05, 0.07, 0.1, 0.14, 0.2, 0.28, 0.4, 0.56, 0.8, 1.1, 1.6, 2.2, 3.2)
HEALTHY_CHANGE_TOLERANCE = 0.01  # mean |y - x| over healthy brain, in normalised intensity (IQR = 0.25)


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


def choose_lambda(model, volumes: list[tuple[torch.Tensor, torch.Tensor]], params: dict[str, Any] | None = None,
                  grid=LAMBDA_GRID, tolerance: float = HEALTHY_CHANGE_TOLERANCE,
                  progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The smallest lambda on ``grid`` whose restoration changes healthy brains by at most
    ``tolerance`` (mean |y - x| over brain pixels), from healthy (slices, mask) volumes.

    A small lambda lets the restoration pull every healthy slice towards the VAE's blurry
    reconstruction (false positives everywhere); a large one forbids the piecewise-smooth
    changes that remove a lesion. The healthy change falls as lambda grows; the first lambda
    at which a healthy scan is left nearly as it is keeps the most sensitivity to lesions.
    """
    curve = []
    chosen = None
    for lam in grid:
        total, n = 0.0, 0
        for y, mask in volumes:
            d, _ = restoration_map(model, y, mask, {**(params or {}), "lambda": lam})
            total += float(d.sum())
            n += int(mask.sum())
        change = total / max(n, 1)
        curve.append({"lambda": lam, "healthy_mean_change": change})
        if progress:
            progress(f"lambda {lam:g}: mean change of healthy brain {change:.4f}")
        if chosen is not None:
            break  # one value past the choice shows the curve flattening; larger ones cannot be chosen
        if change <= tolerance:
            chosen = lam
    if chosen is None:
        chosen = grid[-1]
    return {"lambda": chosen, "selection": {"rule": "smallest lambda with healthy mean change <= tolerance",
                                            "tolerance": tolerance, "curve": curve, "volumes": len(volumes)}}


def tune_package(package, subjects, limit: int | None = None, device: str = "cpu",
                 progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Choose lambda on healthy ``subjects`` and return the package's new ``restoration`` block."""
    from .device import select_device
    from .imageio import as_3d, read_image
    from .volume import brain_mask, prepare_volume

    dev = select_device(device)
    model = package.load_model(dev)
    volumes = []
    for s in subjects[:limit] if limit else subjects:
        image = as_3d(read_image(s.image))
        mask = as_3d(read_image(s.mask, "MASK")) if s.mask else None
        prepared = prepare_volume(image, brain_mask(image, mask), package.contract)
        volumes.append((prepared.slices.to(dev), prepared.mask.to(dev)))
    settings = {**DEFAULT_RESTORATION, **package.meta.get("restoration", {})}
    settings.pop("selection", None)
    chosen = choose_lambda(model, volumes, settings, progress=progress)
    chosen["selection"]["subjects"] = [s.id for s in (subjects[:limit] if limit else subjects)]
    return {**settings, **chosen}


def add_parser(sub) -> None:
    from .cli import add_tuning_arguments
    r = sub.add_parser("tune-restoration",
                       help="choose the restoration method's lambda on healthy scans and store it in the model")
    r.add_argument("model", help="VAE model name or folder")
    add_tuning_arguments(r, limit=5)
    r.set_defaults(func=_cmd)


def _cmd(args) -> int:
    import sys
    from .cli import _subjects_of, changed_copy, store_and_recalibrate
    from .errors import InputError

    with changed_copy(args.model, args.out, args.in_place) as package:
        if "restoration" not in package.methods:
            raise InputError(f"model {package.name} is not a VAE; restoration needs a vae or cevae model")
        say = None if args.quiet else (lambda m: print(m, file=sys.stderr))
        block = tune_package(package, _subjects_of(package, args.data, args.subjects), args.limit, args.device, say)
        store_and_recalibrate(package, "restoration", block, args.data, args.device, say,
                              f"restoration lambda {block['lambda']:g}")
    return 0
