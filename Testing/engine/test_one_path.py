"""One path through the engine (issue 39): a fused package scores itself from its components
(no second pass through the pipeline), two components of one family keep their own slice
scores, and a run hashes each package file once."""

import collections
import json
import os

import numpy as np
import pytest
import SimpleITK as sitk
from phantoms import healthy_folder, image_from, make_tiny_package, phantom_array

from anomaly_localizer.core import hashing
from anomaly_localizer.core.fusion import standardised_slice_scores
from anomaly_localizer.core.package import load_package, update_meta
from anomaly_localizer.core.pipeline import score_volume
from anomaly_localizer.tooling.data import find_subjects
from anomaly_localizer.tooling.release.calibrate import calibrate_package
from anomaly_localizer.tooling.release.fusion import make_fused


@pytest.fixture(scope="module")
def two_vaes(tmp_path_factory):
    """Two calibrated tiny VAEs (different weights) and a fused model of one map of each whose
    slice score mixes both VAEs' ``rec``."""
    root = tmp_path_factory.mktemp("twovae")
    data = healthy_folder(root / "healthy", n=4)
    subjects = find_subjects(data)
    models = root / "models"
    for seed, name in ((0, "vae-a"), (1, "vae-b")):
        pkg = make_tiny_package(models / name, seed=seed)
        calibrate_package(load_package(pkg.path), subjects[:3])
    old = os.environ.get("ANOMALY_LOCALIZER_MODELS")
    os.environ["ANOMALY_LOCALIZER_MODELS"] = str(models)
    fused = make_fused(["vae-a:rec", "vae-b:elbo_grad"], models / "two-vae-fused", str(data), rule="mean",
                       calibrate=False)
    meta = json.loads((fused.path / "model.json").read_text())
    meta["architecture"]["slice_score"] = {"parts": [{"model": "vae-a", "score": "rec", "weight": 1.0},
                                                     {"model": "vae-b", "score": "rec", "weight": 3.0}]}
    update_meta(fused.path, meta)
    yield {"fused": load_package(fused.path), "a": load_package(models / "vae-a"),
           "b": load_package(models / "vae-b"), "root": root}
    if old is None:
        os.environ.pop("ANOMALY_LOCALIZER_MODELS")
    else:
        os.environ["ANOMALY_LOCALIZER_MODELS"] = old


def test_two_components_of_one_family_keep_their_own_slice_scores(two_vaes):
    image = image_from(phantom_array(lesion=True))
    res = score_volume(image, two_vaes["fused"], device="cpu")
    alone = {k: score_volume(image, two_vaes[k], ["rec"], device="cpu") for k in ("a", "b")}
    # both VAEs have a "rec" slice score: each is named by its model, neither overwrites the other
    assert np.allclose(res.slice_scores["vae-a:rec"], alone["a"].slice_scores["rec"], equal_nan=True)
    assert np.allclose(res.slice_scores["vae-b:rec"], alone["b"].slice_scores["rec"], equal_nan=True)
    assert not np.allclose(res.slice_scores["vae-a:rec"], res.slice_scores["vae-b:rec"], equal_nan=True)
    assert "rec" not in res.slice_scores
    ref_a, ref_b = (two_vaes[k].calibration.slice["rec"] for k in ("a", "b"))
    expected = 0.25 * standardised_slice_scores(alone["a"].slice_scores["rec"], ref_a.levels, ref_a.values) + \
        0.75 * standardised_slice_scores(alone["b"].slice_scores["rec"], ref_b.levels, ref_b.values)
    assert np.allclose(res.slice_scores["fused"], expected, rtol=1e-4, atol=1e-5, equal_nan=True)


def test_the_fused_family_scores_without_going_back_through_the_pipeline(two_vaes, monkeypatch):
    """score_volume is the entry: it is entered once for a fused model, never by its components."""
    from anomaly_localizer.core import pipeline
    calls = []
    real = pipeline.score_volume

    def counting(*args, **kwargs):
        calls.append(args[1].name)
        return real(*args, **kwargs)
    monkeypatch.setattr(pipeline, "score_volume", counting)
    pipeline.score_volume(image_from(phantom_array(lesion=True)), two_vaes["fused"], device="cpu")
    assert calls == ["two-vae-fused"]


def test_a_run_hashes_each_package_file_once(two_vaes, tmp_path, monkeypatch):
    from anomaly_localizer.core.scoring import score_study
    hashed = collections.Counter()
    real_open = open

    def counting_open(path, mode="r", *args, **kwargs):
        if "b" in mode and str(path).endswith((".safetensors", ".json", ".md")) and "models" in str(path):
            hashed[str(path)] += 1
        return real_open(path, mode, *args, **kwargs)
    monkeypatch.setattr(hashing, "open", counting_open, raising=False)  # the module's hashing reads
    scan = tmp_path / "scan.nii.gz"
    sitk.WriteImage(image_from(phantom_array(lesion=True)), str(scan))
    score_study([str(scan)], tmp_path / "out", contrasts=["t1"], model=str(two_vaes["fused"].path),
                threshold_level=1.0)
    files = {os.path.basename(os.path.dirname(p)) + "/" + os.path.basename(p) for p in hashed}
    assert {"vae-a/model.safetensors", "vae-b/model.safetensors", "two-vae-fused/model.json"} <= files
    assert max(hashed.values()) == 1, {p: n for p, n in hashed.items() if n > 1}
    # outside a run, every check hashes again (a file changed between runs is seen)
    before = sum(hashed.values())
    load_package(two_vaes["a"].path)
    load_package(two_vaes["a"].path)
    assert sum(hashed.values()) - before == 2 * len(two_vaes["a"].files) + 2  # and the manifest each time


def test_a_weights_file_changed_during_a_run_is_still_refused(two_vaes, tmp_path):
    """Hashing once per run trusts a file only while it is unchanged (size, time, inode)."""
    import shutil
    from anomaly_localizer.errors import PackageError
    path = tmp_path / "copy"
    shutil.copytree(two_vaes["a"].path, path)
    with hashing.one_run():
        pkg = load_package(path)
        weights = path / "model.safetensors"
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))
        os.utime(weights, ns=(os.stat(weights).st_atime_ns, os.stat(weights).st_mtime_ns + 1_000_000))
        with pytest.raises(PackageError, match="does not match"):
            pkg.load_model("cpu")
