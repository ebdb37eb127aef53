"""The README's runnable examples run as written."""

import os
import subprocess
import sys

import SimpleITK as sitk

from logic_helpers import ROOT, engine


def test_the_headless_slicer_example_scores_thresholds_and_exports(tmp_path):
    calib = {"default_fpr": 0.001, "pixel": {"dae": {"n_subjects": 3, "thresholds": [
        {"fpr": 0.01, "value": 0.01}, {"fpr": 0.001, "value": 0.02}, {"fpr": 0.0001, "value": 0.05}],
        "curve": {"fpr": [0.1, 0.01, 0.001, 0.0001], "values": [0.005, 0.01, 0.02, 0.05]}}}}
    model = engine.make_tiny_dae_package(tmp_path / "models" / "tiny-dae", calibration=calib)
    scan = tmp_path / "scan.nrrd"
    sitk.WriteImage(engine.image_from(engine.phantom_array(lesion=True)), str(scan))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "AnomalyLocalizer"), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, str(ROOT / "examples" / "headless_slicer.py"), str(scan), str(tmp_path / "out"),
                          "--model", str(model.path)], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "maps: dae - shown: dae" in run.stdout and "flags 0.1 % of healthy brain voxels" in run.stdout
    assert (tmp_path / "out" / "anomaly.seg.nrrd").is_file() and (tmp_path / "out" / "slice_scores.csv").is_file()
