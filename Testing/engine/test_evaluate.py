"""Metrics are exact, synthetic anomalies are seeded with honest labels, evaluation runs."""

import json

import numpy as np
import pytest
import SimpleITK as sitk

from anomaly_localizer.cli import main
from anomaly_localizer.tooling.metrics import auroc, average_precision, best_dice, dice_at
from anomaly_localizer.tooling.evaluation.synthetic import KINDS, insert_anomaly, make_case

from phantoms import image_from, make_tiny_package, phantom_array


def _brute_auroc(s, y):
    p, n = s[y][:, None], s[~y][None]
    return ((p > n) + 0.5 * (p == n)).mean()


def _brute_ap(s, y):
    prev, ap = 0.0, 0.0
    for t in np.unique(s)[::-1]:
        pred = s >= t
        tp = (pred & y).sum()
        ap += (tp / y.sum() - prev) * tp / pred.sum()
        prev = tp / y.sum()
    return ap


def test_metrics_match_brute_force_with_ties():
    rng = np.random.default_rng(0)
    y = rng.random(600) < 0.2
    s = np.round(rng.normal(size=600) + y, 1)
    assert auroc(s, y) == pytest.approx(_brute_auroc(s, y))
    assert average_precision(s, y) == pytest.approx(_brute_ap(s, y))
    d, t = best_dice(s, y)
    assert d == pytest.approx(dice_at(s, y, t))
    assert d == pytest.approx(max(dice_at(s, y, u - 1e-9) for u in np.unique(s)))


def test_perfect_and_useless_scores():
    y = np.array([0, 0, 1, 1], bool)
    assert auroc(np.array([0, 1, 2, 3.0]), y) == 1 and average_precision(np.array([0, 1, 2, 3.0]), y) == 1
    assert auroc(np.ones(4), y) == 0.5


@pytest.mark.parametrize("kind", KINDS)
def test_every_anomaly_kind_changes_the_brain_where_its_label_says(kind):
    arr = phantom_array((40, 48, 40))
    mask = arr != 0
    out, label = insert_anomaly(arr, mask, (3.0, 3.0, 3.0), kind, np.random.default_rng(1), radius_mm=(10, 14))
    assert label.sum() > 0 and not label[~mask].any()
    changed = np.abs(out - arr) > 0
    assert changed[label > 0].all()
    assert (out[~mask] == arr[~mask]).all()  # nothing outside the brain changes


def test_cases_are_reproducible_from_their_seed():
    arr = phantom_array((40, 48, 40))
    a = make_case(arr, arr != 0, (3.0, 3.0, 3.0), seed=5)
    b = make_case(arr, arr != 0, (3.0, 3.0, 3.0), seed=5)
    assert a[2] == b[2] and np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_evaluate_command_reports_every_method_and_the_baseline(tmp_path):
    root = tmp_path / "data"
    (root / "t1").mkdir(parents=True)
    for i in range(2):
        sitk.WriteImage(image_from(phantom_array(seed=i)), str(root / "t1" / f"H{i}_T1.nii.gz"))
    pkg = make_tiny_package(tmp_path / "tiny")
    assert main(["evaluate", str(pkg.path), "--synthetic", str(root), "--subjects", "all", "--per-subject", "2",
                 "--json", str(tmp_path / "e.json"), "-q"]) == 0
    res = json.loads((tmp_path / "e.json").read_text())
    assert res["cases"] == 4 and res["lesion_voxels"] > 0
    assert {"rec", "rec_grad", "kl_grad", "elbo_grad", "combi", "baseline_intensity", "slice_elbo"} <= set(res["methods"])
    for m in ("rec", "combi", "baseline_intensity"):
        row = res["methods"][m]
        assert 0 <= row["pixel_auroc"] <= 1 and 0 <= row["pixel_ap"] <= 1 and 0 <= row["best_dice"] <= 1
    assert isinstance(res["methods"]["rec"]["beats_baseline"], bool)


def test_evaluate_on_a_folder_of_real_cases(tmp_path):
    for i in range(2):
        case = tmp_path / "cases" / f"case{i}"
        case.mkdir(parents=True)
        arr = phantom_array(lesion=True, seed=i)
        from phantoms import lesion_mask
        sitk.WriteImage(image_from(arr), str(case / "t1.nii.gz"))
        sitk.WriteImage(image_from(lesion_mask().astype(np.uint8) * 2), str(case / "seg.nii.gz"))
    from phantoms import TINY_CALIBRATION
    pkg = make_tiny_package(tmp_path / "tiny", calibration=TINY_CALIBRATION)
    assert main(["evaluate", str(pkg.path), "--cases", str(tmp_path / "cases"), "--image-name", "t1.nii.gz",
                 "--label-name", "seg.nii.gz", "--json", str(tmp_path / "e.json"), "-q"]) == 0
    res = json.loads((tmp_path / "e.json").read_text())
    assert res["cases"] == 2 and res["case_set"]["kind"] == "folder"
    # at the calibrated threshold: how many true lesions a region touches, and a finding (issue 40)
    covered = res["methods"]["rec"]["lesions_at_calibrated"]
    assert covered["lesions"] == 2 and covered["touched_by_a_finding"] <= covered["touched_by_a_region"] <= 2
    # the phantom lesion is the brightest tissue: the intensity baseline finds it perfectly
    assert res["methods"]["baseline_intensity"]["pixel_auroc"] > 0.99
    assert main(["evaluate", str(pkg.path), "-q"]) == 2  # neither --synthetic nor --cases


def test_a_label_on_another_grid_is_refused(tmp_path, capsys):
    case = tmp_path / "cases" / "c"
    case.mkdir(parents=True)
    sitk.WriteImage(image_from(phantom_array()), str(case / "image.nii.gz"))
    sitk.WriteImage(image_from(np.zeros((10, 10, 10), np.uint8)), str(case / "label.nii.gz"))
    pkg = make_tiny_package(tmp_path / "tiny")
    assert main(["evaluate", str(pkg.path), "--cases", str(tmp_path / "cases"), "-q"]) == 2
    assert "not on the grid" in capsys.readouterr().err


def test_per_kind_and_intensity_only_figures_pool_the_right_cases(monkeypatch):
    """Three cases: two intensity anomalies and one deformation. The per-kind figures use only
    that kind's cases; the intensity-only figures pool the two intensity cases and leave the
    deformation out. A fake scorer makes every figure known in advance."""
    from anomaly_localizer.tooling.evaluation import evaluate as ev
    from anomaly_localizer.tooling.evaluation.evaluate import Case, INTENSITY_ONLY
    from anomaly_localizer.core.pipeline import ScoreResult
    shape = (4, 8, 8)
    brain = np.ones(shape, bool)

    def case(kind, lesion_slice, found):
        label = np.zeros(shape, bool)
        label[lesion_slice, :5, :5] = True  # 25 voxels: an abnormal slice
        img = sitk.GetImageFromArray(np.where(label, 2.0, 1.0).astype(np.float32))
        img.SetSpacing((1.0, 1.0, 1.0))
        return Case(f"c:{kind}", img, None, label, kind), found

    cases = [case("shift_up", 1, True), case("uniform", 2, True), case("sink", 3, False)]
    found = {c.id: f for c, f in cases}

    def fake_score(image, package, methods, mask=None, device=None, model=None, bf16=False, study=None):
        arr = sitk.GetArrayFromImage(image)
        lesion = arr > 1.5
        cid = next(c.id for c, _ in cases if np.array_equal(lesion, c.label))
        m = np.where(lesion, 5.0, 0.1).astype(np.float32) if found[cid] else np.full(shape, 0.1, np.float32)
        return ScoreResult(maps={"rec": m}, brain_mask=brain, slice_scores={"x": np.zeros(4)},
                           brain_voxels_per_slice=np.full(4, 64), volume_score=0.0, axial_axis=2, device="cpu")

    from anomaly_localizer.core.schema import Calibration

    class Pkg:
        name, manifest_sha256, primary_slice_score = "fake", "0" * 64, "x"
        methods, detector, meta, calibration = ("rec",), None, {}, Calibration.model_validate({})
        def load_model(self, device): return None
        def default_threshold(self, m): return (1.0, 0.001)

    monkeypatch.setattr(ev, "score_volume", fake_score)
    res = ev.evaluate([(Pkg(), ["rec"])], iter([c for c, _ in cases]), device="cpu")
    rec = res["methods"]["rec"]
    assert rec["pixel_ap_by_kind"] == {"shift_up": 1.0, "uniform": 1.0, "sink": pytest.approx(25 / 256)}
    assert rec["slice_auroc_by_kind"]["shift_up"] == 1.0 and rec["slice_auroc_by_kind"]["sink"] == 0.5
    assert rec["intensity_anomalies_only"] == {"pixel_ap": 1.0, "slice_auroc": 1.0}
    assert rec["pixel_ap"] < 1.0 and rec["slice_auroc"] < 1.0  # the deformation costs the pooled figures
    assert INTENSITY_ONLY in ev.format_table(res)


def test_the_hard_case_set_holds_small_subtle_soft_anomalies_labelled_where_the_image_changed():
    from anomaly_localizer.tooling.evaluation.hard_cases import CHANGE_LABEL, SEMI_AXIS_MM, make_hard_case
    arr = phantom_array((40, 56, 48), seed=3)
    brain = arr != 0
    iqr = np.subtract(*np.percentile(arr[brain], [75, 25]))
    counts, soft, contrasts, kinds = [], 0, [], set()
    for seed in range(14):
        img, ids, anomalies = make_hard_case(arr, brain, (2.0, 2.0, 2.0), seed)
        assert 1 <= len(anomalies) <= 3 and ids.max() <= len(anomalies)
        changed = np.abs(img - arr) > CHANGE_LABEL * iqr
        assert not ((ids > 0) & ~brain).any() and not (changed & ~brain).any()
        assert ((ids > 0) == changed).mean() > 0.999  # labelled where the image changed, not beyond
        for a in anomalies:
            assert all(SEMI_AXIS_MM[0] <= s <= SEMI_AXIS_MM[1] for s in a.semi_axes_mm)
            soft += a.soft
            contrasts.append(a.contrast)
            kinds.add(a.kind)
        counts.append(len(anomalies))
    assert set(counts) == {1, 2, 3} and soft > 5 and len(kinds) >= 5
    assert min(contrasts) < 0.4 and max(contrasts) > 1.5  # barely visible to strong
    a, ids_a, _ = make_hard_case(arr, brain, (2.0, 2.0, 2.0), 7)
    b, ids_b, _ = make_hard_case(arr, brain, (2.0, 2.0, 2.0), 7)
    assert np.array_equal(a, b) and np.array_equal(ids_a, ids_b)  # seeded


def test_evaluate_reports_figures_per_kind_and_per_size_on_the_hard_set(tiny_package, tmp_path):
    from anomaly_localizer.tooling.data import Subject
    from anomaly_localizer.tooling.evaluation.evaluate import case_set, evaluate, format_table
    paths = []
    for i in range(2):
        p = tmp_path / f"h{i}.nii.gz"
        sitk.WriteImage(image_from(phantom_array((30, 48, 40), seed=i), spacing=(3.0, 3.0, 3.0)), str(p))
        paths.append(Subject(f"h{i}", p, None))
    res = evaluate(tiny_package, case_set("hard", paths, per_subject=2, seed=0), device="cpu")
    rec = res["methods"]["rec"]
    assert res["cases"] == 4 and res["cases_by_kind"] and res["cases_by_size"]
    assert set(rec["pixel_ap_by_size"]) == set(res["cases_by_size"]) and set(rec["pixel_ap_by_kind"]) == set(
        res["cases_by_kind"])
    assert "anomaly size" in format_table(res)
