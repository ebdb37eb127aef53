"""3D heatmap smoothing: exact, in mm, inside the brain; chosen on validation cases; applied by
the pipeline as the package says; and the evaluation's slice scores and per-kind figures."""

import json

import numpy as np
import pytest
import SimpleITK as sitk

from anomaly_localizer.cli import main
from anomaly_localizer.tooling.evaluation.evaluate import slice_top_mean
from anomaly_localizer.core.package import load_package, update_meta
from anomaly_localizer.core.pipeline import score_volume
from anomaly_localizer.core.smoothing import smooth_map
from anomaly_localizer.tooling.release.tune_smoothing import choose_smoothing

from phantoms import image_from, make_tiny_package, phantom_array


def _gauss_brute(a: np.ndarray, sigma_vox) -> np.ndarray:
    """Separable Gaussian with zero padding, written out with np.convolve."""
    out = a.astype(np.float64)
    for axis, s in enumerate(sigma_vox):
        if s <= 0:
            continue
        r = max(1, int(np.ceil(3 * s)))
        k = np.exp(-0.5 * (np.arange(-r, r + 1) / s) ** 2)
        k /= k.sum()
        out = np.apply_along_axis(lambda v: np.convolve(v, k, mode="same"), axis, out)
    return out


def test_smoothing_is_a_normalised_gaussian_in_mm_inside_the_brain():
    rng = np.random.default_rng(0)
    brain = phantom_array((20, 24, 22)) != 0
    values = np.where(brain, rng.random(brain.shape), 0).astype(np.float32)
    spacing = (3.0, 2.0, 1.5)  # z, y, x in mm; z is the axial axis
    out = smooth_map(values, brain, spacing, 0, 6.0, 3.0)
    sigma = [6.0 / 3.0, 3.0 / 2.0, 3.0 / 1.5]
    expected = np.where(brain, _gauss_brute(values * brain, sigma) / _gauss_brute(brain.astype(float), sigma), 0)
    assert np.allclose(out, expected, atol=1e-5)
    assert out.dtype == np.float32 and (out[~brain] == 0).all()


def test_a_constant_map_stays_constant_up_to_the_brain_edge_and_zero_widths_change_nothing():
    brain = phantom_array((20, 24, 22)) != 0
    values = np.where(brain, 2.5, 0).astype(np.float32)
    out = smooth_map(values, brain, (2.0, 2.0, 2.0), 0, 8.0, 4.0)
    assert np.allclose(out[brain], 2.5, atol=1e-5)  # no dimming at the edge: normalised convolution
    assert np.array_equal(smooth_map(values, brain, (2.0, 2.0, 2.0), 0, 0.0, 0.0), values)


def test_through_plane_smoothing_moves_values_only_across_slices():
    brain = np.ones((21, 21, 21), bool)  # wider than the kernel: no edge renormalisation at the centre
    values = np.zeros((21, 21, 21), np.float32)
    values[10, 10, 10] = 1.0
    out = smooth_map(values, brain, (2.0, 2.0, 2.0), 1, 4.0, 0.0)  # numpy axis 1 is the axial axis here
    assert out[10, :, 10].sum() == pytest.approx(1.0, abs=1e-3)  # spread along axis 1 only...
    assert out.sum() == pytest.approx(out[10, :, 10].sum())  # ...not along the in-plane axes
    assert out[10, 9, 10] > 0 and out[10, 10, 10] < 1


def _noisy_cases(n=3, seed=0):
    """A ball of anomaly whose map has noise that is independent from slice to slice."""
    rng = np.random.default_rng(seed)
    cases = []
    for _ in range(n):
        z, y, x = np.meshgrid(*[np.arange(24)] * 3, indexing="ij")
        label = (z - 12) ** 2 + (y - 12) ** 2 + (x - 12) ** 2 < 5 ** 2
        brain = np.ones(label.shape, bool)
        noisy = label + rng.normal(0, 0.9, size=(24, 1, 1)) * rng.random((1, 24, 24))  # per-slice noise
        cases.append({"maps": {"noisy": noisy.astype(np.float32), "exact": label.astype(np.float32)},
                      "brain": brain, "label": label, "spacing": (2.0, 2.0, 2.0), "axial": 0})
    return cases


def test_choice_smooths_across_slices_when_that_helps_and_not_when_the_map_is_exact():
    block = choose_smoothing(_noisy_cases(), ["noisy", "exact"], through_grid=(0.0, 4.0), in_grid=(0.0, 2.0))
    assert block["noisy"]["through_plane_mm"] == 4.0
    assert block["exact"] == {"through_plane_mm": 0.0, "in_plane_mm": 0.0}  # ties go to no smoothing
    curve = block["selection"]["curves"]["noisy"]
    assert len(curve) == 4 and max(c["pixel_ap"] for c in curve) == pytest.approx(
        next(c["pixel_ap"] for c in curve if c["through_plane_mm"] == 4.0 and c["in_plane_mm"] ==
             block["noisy"]["in_plane_mm"]))


def test_the_pipeline_applies_the_package_smoothing(tmp_path):
    pkg = make_tiny_package(tmp_path / "tiny")
    img = image_from(phantom_array(lesion=True))
    raw = score_volume(img, pkg, ["rec", "elbo_grad"], smoothing=False)
    meta = dict(pkg.meta)
    meta["map_smoothing"] = {"rec": {"through_plane_mm": 8.0, "in_plane_mm": 4.0}}
    update_meta(pkg.path, meta)
    pkg = load_package(pkg.path)
    res = score_volume(img, pkg, ["rec", "elbo_grad"])
    expected = smooth_map(raw.maps["rec"], raw.brain_mask, img.GetSpacing()[::-1], 2 - raw.axial_axis, 8.0, 4.0)
    assert np.allclose(res.maps["rec"], expected, atol=1e-6)
    assert not np.allclose(res.maps["rec"], raw.maps["rec"])
    assert np.array_equal(res.maps["elbo_grad"], raw.maps["elbo_grad"])  # not listed: unsmoothed
    assert res.info["map_smoothing"] == {"rec": {"through_plane_mm": 8.0, "in_plane_mm": 4.0}}


def test_tune_smoothing_writes_a_choice_per_method_and_recalibrates(tmp_path, monkeypatch):
    data = tmp_path / "healthy"
    data.mkdir()
    for i in range(3):
        sitk.WriteImage(image_from(phantom_array(seed=i)), str(data / f"h{i}.nii.gz"))
    pkg = make_tiny_package(tmp_path / "tiny")
    meta = dict(pkg.meta)
    meta["provenance"] = {"subjects": {"val": ["h0"], "calibration": ["h1", "h2"]}}
    meta["restoration"] = {"steps": 3}  # keep the tiny restoration short
    update_meta(pkg.path, meta)
    out = tmp_path / "smoothed"
    assert main(["tune-smoothing", str(pkg.path), str(data), "--per-subject", "1", "--out", str(out), "-q"]) == 0
    tuned = load_package(out)
    block = tuned.meta["map_smoothing"]
    assert set(block) == set(tuned.methods) | {"selection"}
    assert block["selection"]["subjects"] == ["h0"] and block["selection"]["cases"] == 1
    assert tuned.meta["calibration"]["subjects"] == ["h1", "h2"]  # thresholds of the smoothed maps
    assert "map_smoothing" not in load_package(pkg.path).meta  # the source model is untouched
    # retune one method: the others keep their widths and curves; only that method is scored
    from anomaly_localizer.core import pipeline
    scored, real = [], pipeline.score_volume
    monkeypatch.setattr(pipeline, "score_volume",
                        lambda image, package, methods, **kw: scored.append(list(methods)) or real(image, package,
                                                                                               methods, **kw))
    again = tmp_path / "retuned"
    assert main(["tune-smoothing", str(out), str(data), "--per-subject", "1", "--method", "rec",
                 "--out", str(again), "-q"]) == 0
    assert scored and all(m == ["rec"] for m in scored)  # tuning passes (calibration imports its own)
    retuned = load_package(again).meta["map_smoothing"]
    for m in tuned.methods:
        if m != "rec":
            assert retuned[m] == block[m] and retuned["selection"]["curves"][m] == block["selection"]["curves"][m]
    assert set(retuned) == set(block)
    # on other cases than the kept widths were chosen on: refused, nothing written
    refused = tmp_path / "refused"
    assert main(["tune-smoothing", str(out), str(data), "--per-subject", "2", "--method", "rec",
                 "--out", str(refused), "-q"]) == 2
    assert not refused.exists()


def test_slice_score_of_a_map_is_the_mean_of_its_highest_brain_values():
    values = np.zeros((2, 10, 10), np.float32)
    brain = np.zeros_like(values, bool)
    brain[0, :5] = True  # 50 voxels
    brain[1, 0, :3] = True  # 3 voxels: fewer than k
    values[0, :5] = np.arange(50).reshape(5, 10)
    values[0, 9, 9] = 1000  # outside the brain: ignored
    values[1, 0, :3] = [1, 2, 3]
    out = slice_top_mean(values, brain, 0, k=20)
    assert out[0] == pytest.approx(np.arange(30, 50).mean()) and out[1] == pytest.approx(2.0)
    assert slice_top_mean(values, np.zeros_like(brain), 0, k=20).tolist() == [0.0, 0.0]


def test_synthetic_evaluation_reports_pixel_ap_per_kind(tmp_path):
    root = tmp_path / "data" / "t1"
    root.mkdir(parents=True)
    sitk.WriteImage(image_from(phantom_array(seed=0)), str(root / "H0_T1.nii.gz"))
    pkg = make_tiny_package(tmp_path / "tiny")
    assert main(["evaluate", str(pkg.path), "--synthetic", str(root.parent), "--subjects", "all", "--per-subject", "3", "--case-set", "balls",
                 "--method", "rec", "--json", str(tmp_path / "e.json"), "-q"]) == 0
    res = json.loads((tmp_path / "e.json").read_text())
    kinds = res["cases_by_kind"]
    assert sum(kinds.values()) == 3
    assert set(res["methods"]["rec"]["pixel_ap_by_kind"]) == set(kinds)
    assert set(res["methods"]["baseline_intensity"]["pixel_ap_by_kind"]) == set(kinds)
    assert set(res["methods"]["rec"]["slice_auroc_by_kind"]) == set(kinds)


def test_tune_smoothing_on_scans_that_are_not_the_models_leaves_no_half_made_model(tmp_path, capsys):
    data = tmp_path / "healthy"
    data.mkdir()
    sitk.WriteImage(image_from(phantom_array(seed=0)), str(data / "other.nii.gz"))
    pkg = make_tiny_package(tmp_path / "tiny")
    meta = dict(pkg.meta)
    meta["provenance"] = {"subjects": {"val": ["h0"], "calibration": ["h1"]}}
    update_meta(pkg.path, meta)
    out = tmp_path / "smoothed"
    assert main(["tune-smoothing", str(pkg.path), str(data), "--out", str(out), "-q"]) == 2
    assert "none of the model's val subjects" in capsys.readouterr().err
    assert not out.exists()
