"""Screenshot of the axial view rendered offscreen with Slicer's own slice pipeline: heat
colours and the segmentation outline appear where the phantom's lesion is, not elsewhere.
The PNGs are kept in build/test-artifacts/ as artifacts of the run."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import vtk

HERE = Path(__file__).resolve().parent
ARTIFACTS = HERE.parents[1] / "build" / "test-artifacts"
PROBE = ("import vtk; w = vtk.vtkRenderWindow(); w.SetOffScreenRendering(1); w.SetSize(8, 8); "
         "w.AddRenderer(vtk.vtkRenderer()); w.Render()")


def _png(path: Path) -> np.ndarray:
    reader = vtk.vtkPNGReader()
    reader.SetFileName(str(path))
    reader.Update()
    img = reader.GetOutput()
    from vtk.util.numpy_support import vtk_to_numpy
    w, h, _ = img.GetDimensions()
    arr = vtk_to_numpy(img.GetPointData().GetScalars()).reshape(h, w, -1)
    return arr[::-1, :, :3].astype(int)


def test_heat_and_outline_appear_on_the_lesion_only():
    probe = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, timeout=120)
    if probe.returncode != 0:
        pytest.skip("offscreen OpenGL (EGL or OSMesa) does not work on this machine")
    r = subprocess.run([sys.executable, str(HERE / "render_screenshot.py"), str(ARTIFACTS)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    overlay, background = _png(ARTIFACTS / "overlay.png"), _png(ARTIFACTS / "background.png")
    lesion = background.min(axis=2) > 235  # the lesion is the brightest tissue: white in the scan
    assert lesion.sum() > 200
    # coloured (not grey) pixels: heat (red..yellow) or the segmentation outline
    coloured = (overlay[..., 0] - overlay[..., 2]) > 60
    # The outline and the interpolated edge sit within about one voxel (10 pixels here).
    near = lesion.copy()
    for dy in range(-10, 11):
        for dx in range(-10, 11):
            near |= np.roll(np.roll(lesion, dy, 0), dx, 1)
    assert coloured[lesion].mean() > 0.9, "the lesion is not covered by heat colours"
    assert coloured[~near].sum() == 0, "heat colours away from the lesion"
    assert not ((background[..., 0] - background[..., 2]) > 60).any(), "the scan alone must be grey"
