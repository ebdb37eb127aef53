"""AnomalyLocalizerLogic: engine results as MRML nodes (no Qt; Slicer or slicer-core).

Construct it from a Slicer application logic (``slicer.app.applicationLogic()`` inside
Slicer). It turns a volume node into engine input, runs the engine (in this process for
scripts and tests, or in a child process with progress and cancel for the GUI), and turns
the results into nodes on the input's exact geometry:

- one scalar volume per heatmap method (``<input> anomaly <method>``), in anomaly levels
  (:mod:`anomaly_localizer.core.levels`: 1.0 is the model's 0.01 % healthy false-positive
  threshold); a heat colour table, a 0..1 window, values under the threshold transparent;
- a label map and a segmentation (segment "Anomaly") of the heatmap above the threshold;
- a table of slice scores (with their healthy percentiles) and a plot of them.

Output nodes are remembered on the input node (node references) and reused on a rerun; a
rerun's outputs replace the last run's, so heatmaps of methods it did not compute are removed.
Nothing is added to the scene until a run has succeeded, and a failure while building
nodes removes what that call added, so the scene is never left half-built.

The class is assembled from one mixin per concern: running (:mod:`.run`), nodes and
display (:mod:`.nodes`), the live threshold (:mod:`.threshold`), exports (:mod:`.export`) and
stepping through a screening worklist (:mod:`.worklist`).
"""

from __future__ import annotations

import numpy as np

from .export import ExportMixin
from .geometry import copyGeometry, volumeNodeToImage
from .nodes import HEAT_COLOR_NODE_NAME, REF_PREFIX, NodesMixin
from .run import RunMixin, RunResult
from .threshold import SEGMENT_NAME, ThresholdMixin
from .worklist import WorklistMixin

__all__ = ["AnomalyLocalizerLogic", "RunResult", "volumeNodeToImage", "copyGeometry", "REF_PREFIX",
           "HEAT_COLOR_NODE_NAME", "SEGMENT_NAME"]


class AnomalyLocalizerLogic(RunMixin, NodesMixin, ThresholdMixin, ExportMixin, WorklistMixin):
    """Scriptable logic of the AnomalyLocalizer module; see the README's "Slicer" section."""

    def __init__(self, applicationLogic):
        self.appLogic = applicationLogic
        self.scene = applicationLogic.GetMRMLScene()
        self.result: RunResult | None = None
        self.method: str | None = None
        self.threshold = 0.5
        self.opacity = 0.6
        self._package = None  # package of the last run: calibration for false-positive rates
        self._mask: np.ndarray | None = None  # reused threshold buffer
        self._box = None  # (result, brain bounding box) cache
