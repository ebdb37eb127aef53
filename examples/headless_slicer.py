"""Score a scan with the Slicer module's logic, without the Slicer application.

Needs `pip install slicer-core==5.11.0.6 vtk==9.6.0` beside the engine (the viewer and test extras:
`pip install -e '.[test]'`). Run from the repository root:

    PYTHONPATH=AnomalyLocalizer python examples/headless_slicer.py SCAN.nii.gz OUT_DIR [--model NAME|PATH]

It loads the scan into an MRML scene (in Slicer itself use `slicer.util.loadVolume`; headless,
`SlicerApp.loadVolume` does the same through the Volumes module logic), scores it with the
default model (the fused map and its components), sets the threshold in anomaly levels,
jumps to the most anomalous slice, and exports the segmentation and the slice scores. The
test suite runs this file (Testing/logic/test_examples.py), so it stays true.
"""

import argparse
from pathlib import Path

from AnomalyLocalizerLib.headless import SlicerApp
from AnomalyLocalizerLib.logic import AnomalyLocalizerLogic


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("scan")
    parser.add_argument("out")
    parser.add_argument("--model", help="model name or folder (default: the default model)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    app = SlicerApp()                                   # scene, application logic, module logics
    volume = app.loadVolume(Path(args.scan), "scan")    # a vtkMRMLScalarVolumeNode
    logic = AnomalyLocalizerLogic(app.app)
    result = logic.run(volume, model=args.model, device="cpu")   # synchronous; startRun/finishRun for a child process
    print("maps:", ", ".join(result.maps), "- shown:", logic.method)
    print(f"default threshold: level {logic.threshold:.3f}, flags "
          f"{100 * (logic.healthyFalsePositiveRate() or 0):.3g} % of healthy brain voxels")
    voxels = logic.setThreshold(2.0 * logic.threshold)  # anomaly levels: twice the default is stricter
    print(f"at level {logic.threshold:.3f}: {voxels} voxels segmented")
    logic.jumpToSlice(logic.worstSlice())
    logic.exportSegmentation(out / "anomaly.seg.nrrd", overwrite=True)   # overwrite=False refuses an existing file
    logic.exportSliceScores(out / "slice_scores.csv", overwrite=True)
    print("wrote", out / "anomaly.seg.nrrd", "and", out / "slice_scores.csv")


if __name__ == "__main__":
    main()
