"""AnomalyLocalizer engine: unsupervised anomaly localisation in brain MRI.

Layer 1 of the extension (see DESIGN.md): torch, numpy and SimpleITK only, never Slicer.
Three layers inside it, each importing only those below:

- :mod:`anomaly_localizer.core`: scoring (volume pipeline, packages, networks, one module
  per detector family, smoothing, anomaly levels, results folders);
- :mod:`anomaly_localizer.tooling`: training, calibration, tuning, evaluation, benchmarks,
  model cards, releases;
- :mod:`anomaly_localizer.cli`: the ``anomaly-localizer`` command.

For Python, the entry points are importable from here::

    from anomaly_localizer import score_study           # files of one study into a results folder
    score_study(["t1.nii.gz", "flair.nii.gz"], "results", contrasts=["t1", "flair"])

    from anomaly_localizer import choose_model, score_volume   # images in memory
    package = choose_model(["flair"])
    result = score_volume(flair_image, package, study={"flair": flair_image})
"""

__version__ = "0.2.0"

_API = {"score_study": "core.scoring", "score_volume": "core.pipeline", "ScoreResult": "core.pipeline",
        "choose_model": "core.study", "resolve_package": "core.package", "resolve_package_for": "core.installed",
        "load_package": "core.package"}


def __getattr__(name: str):
    # Loaded on first use: importing the package stays cheap (no torch), e.g. in Slicer.
    if name in _API:
        import importlib
        return getattr(importlib.import_module(f"{__name__}.{_API[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_API)
