"""Fusing component maps (the ``fused`` family, :mod:`.detectors.fused`): the voxel-wise
rules, the fused slice scores (the fused map's top area, or a chosen weighted mean of the
components' own slice scores, each standardised on its healthy slices), and loading the components a fused package names (checked to
be the ones it was made and calibrated with). numpy only at import.
"""

from __future__ import annotations

from typing import Any, Callable

from ..errors import PackageError

TOP_AREA_MM2 = 80.0
SCORED_FILES = ("model.safetensors", "model.json")  # what a component's maps depend on (not its card)


def content_sha256(files: dict[str, str]) -> str:
    """One SHA-256 over a package's weights and model.json digests (from its verified
    manifest): what a fused package pins, so a component's rewritten model card does not
    invalidate it while any change to its weights, settings or calibration does."""
    import hashlib
    return hashlib.sha256("".join(f"{n}:{files.get(n, '')};" for n in SCORED_FILES).encode()).hexdigest()


def load_components(package: Any, device: Any, resolve: Callable[[str], Any]) -> dict[str, Any]:
    """{model name: (its ModelPackage, its loaded network)} for every component model of a
    fused package (found by ``resolve``, a model name to a package), each verified against
    the content hash (:func:`content_sha256`) the fused package pins."""
    return {name: (comp, comp.load_model(device)) for name, comp in resolve_components(package, resolve).items()}


def resolve_components(package: Any, resolve: Callable[[str], Any]) -> dict[str, Any]:
    """{model name: its ModelPackage} for every component model of a fused package, each
    verified against the pinned content hash and offering its method; no network is built."""
    loaded: dict[str, Any] = {}
    for c in package.architecture["components"]:
        if c["model"] in loaded:
            continue
        try:
            comp = resolve(c["model"])
        except PackageError as exc:
            raise PackageError(f"model {package.name} combines {c['model']}, which cannot be used: {exc}") from None
        if content_sha256(comp.files) != c["content_sha256"]:
            raise PackageError(f"model {package.name} was made and calibrated with another version of {c['model']} "
                               f"(weights and model.json {c['content_sha256'][:12]}, installed "
                               f"{content_sha256(comp.files)[:12]}); "
                               f"rebuild it (anomaly-localizer fuse --like {package.name} --out DIR --data DATA), or "
                               "reinstall the models it names")
        foreign = [x for x in comp.contract.contrasts if x not in package.contract.contrasts]
        if foreign:
            raise PackageError(f"model {package.name} reads {', '.join(package.contract.contrasts)} but its component "
                               f"{c['model']} reads {', '.join(foreign)}; a fused model's contract must list every "
                               "contrast its components read. Rebuild it with anomaly-localizer fuse")
        if comp.detector is None or comp.detector.composite or c["method"] not in comp.methods:
            raise PackageError(f"model {package.name}: component {c['model']} does not offer {c['method']}")
        loaded[c["model"]] = comp
    return loaded


def fuse_levels(levels: list[Any], rule: str, weights: list[float]) -> Any:
    """Voxel-wise combination of component level maps (numpy arrays of one shape)."""
    import numpy as np
    # accumulated in place: stacking a 1 mm scan's maps first cost a third of a second
    out = np.array(levels[0], np.float32)
    if rule == "max":
        for level in levels[1:]:
            np.maximum(out, level, out=out)
        return out
    w = np.asarray(weights if rule == "weighted" else [1.0] * len(levels), np.float32)
    w = w / w.sum()
    out *= w[0]
    for wi, level in zip(w[1:], levels[1:]):
        out += wi * np.asarray(level, np.float32)
    return out


def top_area_slice_scores(fused: Any, brain: Any, axial_axis: int, spacing_zyx: tuple[float, ...]) -> Any:
    """(n_axial,) mean of each axial slice's highest values over :data:`TOP_AREA_MM2` inside
    the brain; NaN for slices without brain. ``axial_axis`` is the numpy axis of the arrays
    (z, y, x order) and ``spacing_zyx`` their spacing in that order."""
    import numpy as np
    plane = [s for i, s in enumerate(spacing_zyx) if i != axial_axis]
    k = max(1, int(round(TOP_AREA_MM2 / (plane[0] * plane[1]))))
    v = np.moveaxis(np.where(brain, fused, -np.inf), axial_axis, 0).reshape(fused.shape[axial_axis], -1)
    k = min(k, v.shape[1])
    top = -np.partition(-v, k - 1, axis=1)[:, :k]
    counts = np.moveaxis(brain, axial_axis, 0).reshape(len(v), -1).sum(1)
    out = np.full(len(v), np.nan, np.float32)
    for i in np.nonzero(counts)[0]:
        row = top[i][np.isfinite(top[i])]
        out[i] = row.mean()
    return out


def standardised_slice_scores(values: Any, levels: list[float], quantiles: list[float]) -> Any:
    """Slice scores in units of their healthy spread: (s - healthy median) / (healthy 99th
    percentile - median), from a calibration's slice reference (``levels`` in percent and
    their ``quantiles``), so scores of different detectors can be averaged: 0 is a typical
    healthy slice, 1 as high as the top 1 %."""
    import numpy as np
    q50, q99 = np.interp([50.0, 99.0], levels, quantiles)
    return (np.asarray(values, np.float64) - q50) / max(q99 - q50, 1e-12)


def combined_slice_scores(slice_scores: dict[tuple[str, str], Any], parts: list[dict[str, Any]],
                          references: dict[str, Any]) -> Any:
    """The weighted mean of standardised component slice scores (a fused package's
    ``slice_score.parts``: model, score, weight); ``slice_scores``: {(model, score): values},
    so two components of one family keep their own; ``references``: {model: its Calibration}."""
    import numpy as np
    total = sum(p["weight"] for p in parts)
    out = 0.0
    for p in parts:
        ref = references[p["model"]].slice[p["score"]]
        out = out + p["weight"] / total * standardised_slice_scores(slice_scores[(p["model"], p["score"])], ref.levels,
                                                                         ref.values)
    return np.asarray(out, np.float32)
