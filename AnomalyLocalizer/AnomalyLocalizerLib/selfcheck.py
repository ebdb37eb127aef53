"""The whole flow a reader follows, checked end to end with the installed models: score a scan,
move the threshold, jump to the worst slice, export, rerun without duplicating nodes, show a
fused model's components, add restoration, run latent space restoration.

The module's in-app test runs it inside Slicer on a real scan ("Reload and Test" in Developer
mode); the logic tests run it headless on a phantom with tiny models, so both check one flow.
"""

from __future__ import annotations

import os
import tempfile
from typing import Callable

import numpy as np


def _check(condition, what: str) -> None:
    if not condition:
        raise AssertionError(what)


def wholeFlow(logic, volume, say: Callable[[str], None] = lambda message: None) -> None:
    """Follow the flow on ``volume`` with ``logic`` (:class:`.logic.AnomalyLocalizerLogic`);
    ``say`` shows each step (Slicer's ``delayDisplay``). Raises AssertionError on what fails."""
    models = logic.availableModels()
    _check(models, "no model installed")
    say("Scoring")  # a whole head without a mask: the built-in brain extraction finds the brain
    result = logic.run(volume, device="cpu")
    heat = logic.outputNode(volume, f"heatmap.{logic.method}")
    _check(heat is not None, "no heatmap node")
    _check(heat.GetImageData().GetDimensions() == volume.GetImageData().GetDimensions(), "heatmap not on the input grid")
    nodes = logic.scene.GetNumberOfNodes()

    low, high = logic.setThreshold(0.1), logic.setThreshold(0.9)
    _check(low >= high, "a higher threshold segmented more voxels")
    logic.jumpToSlice(logic.worstSlice())

    with tempfile.TemporaryDirectory() as tmp:
        seg = logic.exportSegmentation(os.path.join(tmp, "anomaly.seg.nrrd"))
        table = logic.exportSliceScores(os.path.join(tmp, "scores.csv"))
        _check(os.path.getsize(seg) > 0 and os.path.getsize(table) > 0, "an export is empty")

    logic.run(volume, device="cpu")
    _check(logic.scene.GetNumberOfNodes() == nodes, "a rerun added nodes instead of reusing them")
    _check(np.isfinite(result.summary["volume_score"]["value"]), "the volume score is not finite")

    # The default fused map comes with each of its components, one click away.
    if "fusion" in result.summary:
        for component in result.summary["fusion"]["components"]:
            _check(logic.outputNode(volume, f"heatmap.{component['method']}") is not None,
                   f"no heatmap of component {component['method']}")
        logic.setMethod(result.summary["fusion"]["components"][0]["method"])

    # The restoration methods: restoration on request with a VAE, lsr with the LSR model.
    say("Restoration and latent space restoration")
    vae = next((m for m in models if "restoration" in m["offers"]), None)
    if vae is not None:
        restored = logic.run(volume, device="cpu", model=vae["path"],
                             methods=logic.methodsFor(vae["path"], includeRestoration=True))
        _check("restoration" in restored.maps, "restoration was asked for and not made")
    if any("lsr" in m["offers"] for m in models):
        lsr = logic.run(volume, device="cpu", methods=["lsr"])
        _check(list(lsr.maps) == ["lsr"], f"an lsr run made {list(lsr.maps)}")
        _check(logic.outputNode(volume, "heatmap.lsr") is not None, "no lsr heatmap node")
        _check(logic.outputNode(volume, "heatmap.restoration") is None, "a rerun kept the last run's heatmaps")
        logic.jumpToSlice(logic.worstSlice())
