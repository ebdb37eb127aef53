"""AnomalyLocalizer engine: unsupervised anomaly localisation in brain MRI.

Layer 1 of the extension (see DESIGN.md): torch, numpy and SimpleITK only, never Slicer.
The public entry points are :func:`anomaly_localizer.pipeline.score_volume` for Python
and the ``anomaly-localizer`` command (:mod:`anomaly_localizer.cli`).
"""

__version__ = "0.1.0"
