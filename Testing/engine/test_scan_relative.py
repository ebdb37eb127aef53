"""Scan-relative maps: a map divided by its own brain quantile on each scan, declared per
method in the package, calibrated like any map, chosen on validation cases only where it
helps, and a note when a scan's map is raised overall beyond every healthy scan's."""

import json

import numpy as np
import pytest
from phantoms import healthy_folder, image_from, make_tiny_package, phantom_array

from anomaly_localizer.cli import main
from anomaly_localizer.core.levels import broad_flag_note
from anomaly_localizer.core.package import load_package, update_meta
from anomaly_localizer.core.pipeline import score_volume
from anomaly_localizer.core.relative import reference_note, reference_summary, relative_to_scan
from anomaly_localizer.errors import InputError, PackageError
from anomaly_localizer.tooling.release.calibrate import calibrate_package
from anomaly_localizer.tooling.data import find_subjects


def _with(pkg, **blocks):
    meta = dict(pkg.meta)
    meta.update(blocks)
    update_meta(pkg.path, meta)
    return load_package(pkg.path)


@pytest.fixture(scope="module")
def healthy(tmp_path_factory):
    """Six healthy phantoms and a tiny model that records which are validation and calibration."""
    root = tmp_path_factory.mktemp("relative")
    data = healthy_folder(root / "healthy", n=6)
    ids = [s.id for s in find_subjects(data)]
    pkg = make_tiny_package(root / "tiny")
    pkg = _with(pkg, provenance={"subjects": {"val": ids[:2], "calibration": ids[2:5], "test": ids[5:]}},
                restoration={"steps": 2})
    return {"root": root, "data": data, "package": pkg, "ids": ids}


def test_a_relative_map_is_the_absolute_map_divided_by_its_own_brain_quantile(tmp_path):
    pkg = make_tiny_package(tmp_path / "tiny")
    img = image_from(phantom_array(lesion=True))
    absolute = score_volume(img, pkg, ["rec", "elbo_grad"])
    pkg = _with(pkg, scan_relative={"rec": {"quantile": 0.5}})
    res = score_volume(img, pkg, ["rec", "elbo_grad"])
    brain = absolute.brain_mask
    median = float(np.quantile(absolute.maps["rec"][brain], 0.5))
    assert np.allclose(res.maps["rec"], absolute.maps["rec"] / median, rtol=1e-5)
    assert np.array_equal(res.maps["elbo_grad"], absolute.maps["elbo_grad"])  # not declared: absolute
    assert res.info["scan_relative"] == {"rec": {"quantile": 0.5, "scan_value": pytest.approx(median)}}
    for k, v in absolute.slice_scores.items():  # slice scores stay absolute
        assert np.array_equal(res.slice_scores[k], v, equal_nan=True)
    # the relative map is the same whatever the scan's overall scale: a map raised everywhere
    # by a factor divides back to the same values
    values = absolute.maps["rec"]
    assert np.allclose(relative_to_scan(3.0 * values, brain, 0.5)[0], relative_to_scan(values, brain, 0.5)[0])


def test_a_map_without_a_positive_reference_is_refused_with_advice():
    brain = np.ones((4, 4, 4), bool)
    with pytest.raises(InputError, match="percentile over the brain is 0"):
        relative_to_scan(np.zeros((4, 4, 4), np.float32), brain, 0.5)


def test_the_schema_bounds_the_quantile_and_names_only_offered_maps(tmp_path):
    pkg = make_tiny_package(tmp_path / "tiny")
    for block, field in (({"rec": {"quantile": 1.5}}, "scan_relative.rec.quantile"),
                         ({"rec": {"quantile": "median"}}, "scan_relative.rec.quantile"),
                         ({"rec": {"q": 0.5}}, "scan_relative.rec.q")):
        meta = dict(pkg.meta, scan_relative=block)
        (pkg.path / "model.json").write_text(json.dumps(meta))
        with pytest.raises(PackageError, match=field.replace(".", r"\.")):
            _reload(pkg.path)
    meta = dict(pkg.meta, scan_relative={"lsr": {"quantile": 0.5}})
    (pkg.path / "model.json").write_text(json.dumps(meta))
    with pytest.raises(PackageError, match="scan_relative names lsr, which the model does not offer"):
        _reload(pkg.path)


def _reload(path):
    """Load a package whose model.json was rewritten by hand (hashes written again first, so
    only the schema can refuse it)."""
    from anomaly_localizer.core.package import write_manifest
    write_manifest(path)
    return load_package(path)


def test_calibration_keeps_every_healthy_scans_reference(healthy, tmp_path):
    import shutil
    path = tmp_path / "rel"
    shutil.copytree(healthy["package"].path, path)
    pkg = _with(load_package(path), scan_relative={"rec": {"quantile": 0.5}})
    subjects = [s for s in find_subjects(healthy["data"]) if s.id in healthy["ids"][2:5]]
    pkg = calibrate_package(pkg, subjects)
    refs = pkg.calibration.scan_reference["rec"]
    assert len(refs) == 3 and refs == sorted(refs) and min(refs) > 0
    assert set(pkg.calibration.scan_reference) == {"rec"}
    # thresholds are on the relative maps: the calibration scans' relative maps cross the
    # 1 % threshold on 1 % of their brains
    from anomaly_localizer.core.imageio import read_image
    t = next(x.value for x in pkg.calibration.pixel["rec"].thresholds if x.fpr == 0.01)
    above = total = 0
    for s in subjects:
        res = score_volume(read_image(s.image), pkg, ["rec"])
        above += int((res.maps["rec"][res.brain_mask] > t).sum())
        total += int(res.brain_mask.sum())
    assert above / total == pytest.approx(0.01, abs=0.002)


def test_a_scan_raised_overall_beyond_every_healthy_scan_gets_a_context_line_not_an_alarm(tmp_path):
    """Scans from other scanners and average templates are raised overall (the demo's template
    2.0 times): the scan-relative map allows for that, so the record says it in one line beside
    the map's reference, and the segmentation's note (what to act on) stays for broad flags."""
    pkg = make_tiny_package(tmp_path / "tiny", calibration={"default_fpr": 0.001,
                                                           "scan_reference": {"rec": [1.0, 1.1, 1.2]}})
    summary = {"scan_relative": reference_summary(pkg, {"rec": {"quantile": 0.5, "scan_value": 2.2}})}
    entry = summary["scan_relative"]["rec"]
    assert entry["healthy_median"] == pytest.approx(1.1) and entry["times_healthy_median"] == pytest.approx(2.0)
    note = reference_note("rec", entry)
    assert "2.0 times as high overall" in note and "relative to the scan's own median" in note
    assert entry["note"] == note and "\n" not in note and len(note) < 240
    other = reference_summary(pkg, {"rec": {"quantile": 0.75, "scan_value": 2.2}})["rec"]
    assert "75th percentile" in reference_note("rec", other) and "median" not in reference_note("rec", other)
    within = reference_summary(pkg, {"rec": {"quantile": 0.5, "scan_value": 1.3}})["rec"]  # within 20 % of the top
    assert reference_note("rec", within) is None and "note" not in within
    assert broad_flag_note(0.001, 0.001) is None  # a raised scan flagged like a healthy one: nothing to act on
    assert broad_flag_note(0.5, 0.001).startswith("50.0 % of this brain")


def test_score_writes_what_the_map_was_divided_by(healthy, tmp_path):
    import shutil
    path = tmp_path / "rel"
    shutil.copytree(healthy["package"].path, path)
    _with(load_package(path), scan_relative={"rec": {"quantile": 0.5}})
    scan = tmp_path / "scan.nii.gz"
    import SimpleITK as sitk
    sitk.WriteImage(image_from(phantom_array(lesion=True)), str(scan))
    out = tmp_path / "out"
    assert main(["score", str(scan), "--model", str(path), "--method", "rec", "--threshold", "1.5",
                 "--out", str(out), "-q"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    entry = summary["scan_relative"]["rec"]
    assert entry["quantile"] == 0.5 and entry["scan_value"] > 0 and entry["healthy_median"] is None  # uncalibrated
    heat = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "rec.nii.gz")))
    brain = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "brainmask.nii.gz"))) > 0
    assert np.median(heat[brain]) == pytest.approx(1.0, rel=1e-3)  # divided by its own median


def test_the_command_chooses_on_validation_cases_and_recalibrates(healthy, tmp_path, capsys):
    src, data = healthy["package"], str(healthy["data"])
    out = tmp_path / "chosen"
    assert main(["scan-relative", str(src.path), data, "--method", "rec", "--method", "combi", "--per-subject", "1",
                 "--out", str(out), "-q"]) == 0
    pkg = load_package(out)
    block = pkg.meta["scan_relative"]
    for m in ("rec", "combi"):
        sel = block["selection"][m]
        assert sel["subjects"] == healthy["ids"][:2] and sel["cases"] == 2 and sel["seed"] == 1
        ap = sel["pixel_ap"][m]
        assert set(ap) == {"absolute", "0.5", "0.75", "0.9"}
        best = max(("0.5", "0.75", "0.9"), key=ap.get)
        if ap[best] > ap["absolute"]:  # kept only where it beats the absolute map
            assert block[m] == {"quantile": float(best)}
        else:
            assert m not in block
    assert pkg.calibration.subjects == healthy["ids"][2:5]
    assert "scan_relative" not in load_package(src.path).meta  # the source model is untouched
    # a given quantile, then absolute again
    given = tmp_path / "given"
    assert main(["scan-relative", str(out), data, "--method", "rec", "--quantile", "0.75", "--out", str(given),
                 "-q"]) == 0
    g = load_package(given)
    assert g.scan_relative("rec") == 0.75 and len(g.calibration.scan_reference["rec"]) == 3
    # choosing again on a model whose map is already relative chooses on the same absolute maps
    again = tmp_path / "again"
    assert main(["scan-relative", str(given), data, "--method", "rec", "--per-subject", "1", "--out", str(again),
                 "-q"]) == 0
    redo = load_package(again).meta["scan_relative"]["selection"]["rec"]["pixel_ap"]["rec"]
    assert redo == pytest.approx(block["selection"]["rec"]["pixel_ap"]["rec"], rel=1e-4)
    # only the changed map is recalibrated: the others keep their thresholds (restoration costs minutes a scan)
    for m in ("restoration", "kl_grad"):
        assert g.calibration.pixel[m] == load_package(out).calibration.pixel[m]
    assert g.calibration.pixel["rec"] != load_package(out).calibration.pixel["rec"] or pkg.scan_relative("rec")
    back = tmp_path / "back"
    assert main(["scan-relative", str(given), data, "--method", "rec", "--absolute", "--out", str(back), "-q"]) == 0
    assert load_package(back).scan_relative("rec") is None
    assert "rec" not in load_package(back).calibration.scan_reference


def test_bad_requests_are_refused_before_anything_is_written(healthy, tmp_path, capsys):
    src, data = healthy["package"], str(healthy["data"])
    for extra, says in ((["--method", "rec", "--quantile", "1.2"], "outside 0.05-0.95"),
                        (["--method", "lsr"], "lsr"),
                        (["--method", "rec", "--quantile", "0.5", "--absolute"], "not both")):
        out = tmp_path / "refused"
        assert main(["scan-relative", str(src.path), data, *extra, "--out", str(out), "-q"]) == 2
        assert not out.exists() and says in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "nodata"
    assert main(["scan-relative", str(src.path), str(empty), "--method", "rec", "--out", str(out), "-q"]) == 2
    assert not out.exists()


def test_real_cases_weigh_in_the_choice_and_are_recorded_by_name(healthy, tmp_path, capsys):
    import SimpleITK as sitk
    from phantoms import lesion_mask
    src, data = healthy["package"], str(healthy["data"])
    cases = tmp_path / "tumours"
    for name in ("t1", "t2"):
        (cases / name).mkdir(parents=True)
        sitk.WriteImage(image_from(phantom_array(lesion=True)), str(cases / name / "image.nii.gz"))
        sitk.WriteImage(image_from(lesion_mask().astype(np.uint8)), str(cases / name / "label.nii.gz"))
    out = tmp_path / "with-real"
    assert main(["scan-relative", str(src.path), data, "--method", "rec", "--per-subject", "1",
                 "--select-cases", str(cases), "--select-ids", "t2", "--out", str(out), "-q"]) == 0
    sel = load_package(out).meta["scan_relative"]["selection"]["rec"]
    assert "real cases t2" in sel["rule"] and set(sel["real_cases_pixel_ap"]["rec"]["0.5"]) == {"t2"}
    figure = {k: 0.5 * (sel["pixel_ap"]["rec"][k] + sel["real_cases_pixel_ap"]["rec"][k]["t2"])
              for k in ("absolute", "0.5", "0.75", "0.9")}
    best = max(("0.5", "0.75", "0.9"), key=figure.get)
    block = load_package(out).meta["scan_relative"]
    assert block.get("rec") == ({"quantile": float(best)} if figure[best] > figure["absolute"] else None)
    from anomaly_localizer.tooling.release.modelcard import _scan_relative_lines
    assert "mean pixel AP of the real cases t2: absolute" in _scan_relative_lines(load_package(out).meta)
    refused = tmp_path / "refused"
    assert main(["scan-relative", str(src.path), data, "--method", "rec", "--select-cases", str(cases),
                 "--select-ids", "t9", "--out", str(refused), "-q"]) == 2
    assert not refused.exists() and "no such case folder" in capsys.readouterr().err
