"""AnomalyLocalizerLogic: engine results as MRML nodes (no Qt; Slicer or slicer-core).

Construct it from a Slicer application logic (``slicer.app.applicationLogic()`` inside
Slicer). It turns the volume nodes of a study (one or more co-registered scans, each with its
contrast: :mod:`.inputs`) into engine input, runs the engine (in this process for
scripts and tests, or in a child process with progress and cancel for the GUI), and turns
the results into nodes on the input's exact geometry:

- one scalar volume per heatmap method (``<input> anomaly <method>``), in anomaly levels
  (:mod:`anomaly_localizer.core.levels`: 1.0 is the model's 0.01 % healthy false-positive
  threshold); a heat colour table, a 0..1 window, values under the threshold transparent;
- a label map and a segmentation (segment "Anomaly") of the heatmap above the threshold;
- a table of slice scores (with their healthy percentiles) and a plot of them.

A run belongs to the scene it started in: closing the scene cancels a running child run and
forgets the last result, so that nothing lands on a node of the next scene (node IDs are
reused after a scene clear). Output nodes are remembered on the input node (node references) and reused on a rerun; a
rerun's outputs replace the last run's, so heatmaps of methods it did not compute are removed.
Nothing is added to the scene until a run has succeeded, and a failure while building
nodes removes what that call added, so the scene is never left half-built.

The class is assembled from one mixin per concern: input volumes and their contrasts
(:mod:`.inputs`), running (:mod:`.run`), nodes and
display (:mod:`.nodes`), the live threshold (:mod:`.threshold`), its findings (:mod:`.findings`), exports (:mod:`.export`) and
stepping through a screening worklist (:mod:`.worklist`).
"""

from __future__ import annotations

import weakref

import numpy as np

from .export import ExportMixin
from .findings import FindingsMixin
from .geometry import copyGeometry, volumeNodeToImage
from .inputs import InputsMixin, SuggestedInput
from .nodes import HEAT_COLOR_NODE_NAME, REF_PREFIX, NodesMixin
from .run import RunMixin, RunResult
from .threshold import SEGMENT_NAME, ThresholdMixin
from .worklist import WorklistMixin

__all__ = ["AnomalyLocalizerLogic", "RunResult", "SuggestedInput", "volumeNodeToImage", "copyGeometry", "REF_PREFIX",
           "HEAT_COLOR_NODE_NAME", "SEGMENT_NAME"]


def _weakCallback(method):
    """An observer callback that does not keep its object alive. A bound method held by the
    scene would make a reference cycle (logic -> scene -> observer -> logic) that only the
    garbage collector breaks, destroying VTK objects in an arbitrary order (a crash); this
    way the logic is freed when its last user drops it, and the callback does nothing then."""
    ref = weakref.WeakMethod(method)

    def callback(caller, event):
        bound = ref()
        if bound is not None:
            bound(caller, event)
    return callback


class AnomalyLocalizerLogic(InputsMixin, RunMixin, NodesMixin, ThresholdMixin, FindingsMixin, ExportMixin, WorklistMixin):
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
        self._resultInput = None  # the volume node the result belongs to
        self.activeRun = None  # the child run in progress (runner.ChildRun), if any
        self._closeObserver = self.scene.AddObserver(self.scene.StartCloseEvent, _weakCallback(self._onSceneStartClose))
        # A logic dropped without cleanup() stops observing at once, while its scene is alive: left
        # registered, the observer would be called by the scene's own destructor when the garbage
        # collector frees both (a dying VTK object handed to Python: a crash, seen in the tests).
        self._stopObserving = weakref.finalize(self, self.scene.RemoveObserver, self._closeObserver)
        self._stopObserving.atexit = False  # at interpreter exit the scene may be gone already

    def _onSceneStartClose(self, caller=None, event=None) -> None:
        self.cancelRun()
        self.clearResult()

    def clearResult(self) -> None:
        """Forget the last run's result (its nodes stay in the scene, if it still exists)."""
        self.result, self.method, self._package, self._mask, self._box = None, None, None, None, None
        self._resultInput = None

    def cleanup(self) -> None:
        """Stop observing the scene and stop a running child run (the module is closing)."""
        self.cancelRun()
        self._stopObserving()  # once; nothing when already done
