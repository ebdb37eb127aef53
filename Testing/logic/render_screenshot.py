"""Render the axial view of a scored phantom offscreen with Slicer's slice pipeline.

Run as a child process by test_screenshot.py (VTK can crash without offscreen OpenGL):
``python render_screenshot.py OUT_DIR`` writes background.png (scan only) and
overlay.png (scan, heatmap overlay, segmentation outline) of the same axial slice.
"""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "AnomalyLocalizer"))
sys.path.insert(0, str(HERE.parents[1] / "Testing" / "engine"))

import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402
import vtk  # noqa: E402
from slicer import util as sutil  # noqa: E402

import phantoms  # noqa: E402
from AnomalyLocalizerLib.headless import SlicerApp, renderSliceView  # noqa: E402
from AnomalyLocalizerLib.logic import AnomalyLocalizerLogic, RunResult  # noqa: E402


class _Uncalibrated:
    calibration: dict = {}

    @staticmethod
    def default_threshold(method):
        return None


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    app = SlicerApp()
    sliceLogic = app.addSliceView("Red", "Axial")
    image = phantoms.psr_image(phantoms.phantom_array(lesion=True))  # stored P,S,R like IXI
    sitk.WriteImage(image, str(out / "phantom.nrrd"))
    scan = app.loadVolume(out / "phantom.nrrd", "phantom")
    voxels = sutil.arrayFromVolume(scan).copy()
    brain, lesion = voxels != 0, voxels > 1400
    # A heatmap that is the lesion: this test is about display and geometry, not the model.
    heat = np.where(lesion, 0.8, 0.05 * brain).astype(np.float32)
    logic = AnomalyLocalizerLogic(app.app)
    scores = {k: np.zeros(voxels.shape[1]) for k in ("elbo", "kl", "rec")}
    logic._applyResult(scan, RunResult(scan.GetID(), {"combi": heat}, brain, scores, 1, {"model": {"name": "phantom"}}),
                       _Uncalibrated())
    logic.setThreshold(0.5)
    logic.setOpacity(0.7)
    centre = np.argwhere(lesion).mean(axis=0)[::-1]  # i, j, k
    m = vtk.vtkMatrix4x4()
    scan.GetIJKToRASMatrix(m)
    ras = m.MultiplyPoint([*centre, 1.0])[:3]
    sliceLogic.FitSliceToBackground(400, 400)
    sliceLogic.GetSliceNode().JumpSliceByOffsetting(*ras)
    renderSliceView(app, sliceLogic, out / "overlay.png")
    composite = sliceLogic.GetSliceCompositeNode()
    composite.SetForegroundOpacity(0.0)
    logic.outputNode(scan, "segmentation").GetDisplayNode().SetVisibility(False)
    renderSliceView(app, sliceLogic, out / "background.png")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
