"""Choosing restoration's lambda on healthy validation scans, without labels
(:mod:`anomaly_localizer.core.restoration`)."""

from __future__ import annotations

from typing import Any, Callable

import torch

from ...core.restoration import DEFAULT_RESTORATION, restoration_map

LAMBDA_GRID = (0.05, 0.07, 0.1, 0.14, 0.2, 0.28, 0.4, 0.56, 0.8, 1.1, 1.6, 2.2, 3.2)
HEALTHY_CHANGE_TOLERANCE = 0.01  # mean |y - x| over healthy brain, in normalised intensity (IQR = 0.25)


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
    from ...core.device import select_device
    from ...core.imageio import as_3d, read_image
    from ...core.volume import brain_mask, prepare_volume

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
