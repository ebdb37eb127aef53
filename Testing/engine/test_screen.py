"""Screening: scans found in files, folders, DICOM series and CSV lists, scored into a ranked
worklist that survives interruptions and reruns, and the same on a local Dask cluster."""

import csv
import json
import os

import numpy as np
import pytest
import SimpleITK as sitk
from phantoms import healthy_folder, image_from, make_tiny_dae_package, phantom_array, write_dicom_series

from anomaly_localizer.cli import main
from anomaly_localizer.cli.score import score_file
from anomaly_localizer.core.levels import volume_percentile
from anomaly_localizer.core.results import read_results
from anomaly_localizer.core.worklist import read_worklist
from anomaly_localizer.errors import InputError
from anomaly_localizer.tooling.release.calibrate import calibrate_package
from anomaly_localizer.tooling.data import find_subjects
from anomaly_localizer.tooling.screening.screen import ScreenOptions, plan, run_screening
from anomaly_localizer.tooling.screening.screen_inputs import find_scans

SHAPE = (24, 40, 34)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny DAE calibrated on healthy phantoms, with the scan-level calibration."""
    root = tmp_path_factory.mktemp("screen-model")
    subjects = find_subjects(healthy_folder(root / "healthy", n=3, shape=SHAPE))
    return calibrate_package(make_tiny_dae_package(root / "tiny-dae"), subjects)


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    """A folder of mixed scans: NIfTI and NRRD files in sub-folders, a DICOM series, a
    corrupt file, a mask and a text file that are not scans."""
    root = tmp_path_factory.mktemp("screen-inputs") / "scans"
    (root / "a").mkdir(parents=True)
    (root / "b" / "deep").mkdir(parents=True)
    healthy = phantom_array(SHAPE, seed=11)
    sitk.WriteImage(image_from(healthy), str(root / "a" / "healthy.nii.gz"))
    sitk.WriteImage(image_from((healthy != 0).astype(np.uint8)), str(root / "a" / "healthy_brainmask.nii.gz"))
    sitk.WriteImage(image_from(phantom_array(SHAPE, lesion=True, seed=12)), str(root / "a" / "lesion.nii.gz"))
    sitk.WriteImage(image_from(phantom_array(SHAPE, seed=13) * 1.1), str(root / "b" / "deep" / "other.nrrd"))
    write_dicom_series(phantom_array(SHAPE, seed=14), root / "dicom" / "series1")
    sitk.WriteImage(image_from(phantom_array(SHAPE, seed=15)), str(root / "corrupt.nii"))
    raw = (root / "corrupt.nii").read_bytes()
    (root / "corrupt.nii").write_bytes(raw[: len(raw) // 2])
    (root / "README.txt").write_text("not a scan\n")
    return root


def options(model) -> ScreenOptions:
    return ScreenOptions(str(model.path), model.name, model.manifest_sha256, ("dae",))


def test_folders_are_searched_for_files_and_dicom_series(scans):
    found, messages = find_scans([str(scans)])
    assert [s.id for s in found] == ["corrupt", "healthy", "lesion", "other", "series1"]
    dicom = found[-1]
    assert dicom.series and os.path.isdir(dicom.path)
    assert any("named like masks" in m for m in messages)  # the brain mask is not a scan


def test_scans_sharing_a_name_are_told_apart_by_their_folders(tmp_path):
    for folder in ("site1", "site2"):
        (tmp_path / folder).mkdir()
        sitk.WriteImage(image_from(phantom_array(SHAPE)), str(tmp_path / folder / "T1.nii.gz"))
    sitk.WriteImage(image_from(phantom_array(SHAPE)), str(tmp_path / "worklist.csv.nii.gz"))
    found, _ = find_scans([str(tmp_path)])
    assert [s.id for s in found] == ["worklist.csv-2", "site1_T1", "site2_T1"]  # never a worklist file's name


def test_the_scan_level_percentile_is_the_share_of_healthy_scans_at_most_as_high():
    calibration = {"volume": {"values": [1.0, 2.0, 3.0, 4.0]}}
    assert [volume_percentile(calibration, v) for v in (0.5, 2.0, 3.5, 9.0)] == [0.0, 50.0, 75.0, 100.0]
    assert volume_percentile({}, 1.0) is None and volume_percentile(calibration, float("nan")) is None


def test_a_csv_lists_scans_with_masks_and_ids(scans, tmp_path):
    listing = tmp_path / "list.csv"
    listing.write_text(f"path,mask,id\n{scans}/a/healthy.nii.gz,{scans}/a/healthy_brainmask.nii.gz,case 1\n"
                       f"{scans}/dicom/series1,,\n")
    found, _ = find_scans([str(listing)])
    assert [s.id for s in found] == ["case_1", "series1"] and found[0].mask.endswith("brainmask.nii.gz")
    assert found[1].series
    bad = tmp_path / "bad.csv"
    bad.write_text("file\nx.nii.gz\n")
    with pytest.raises(InputError, match="no 'path' column"):
        find_scans([str(bad)])


@pytest.fixture(scope="module")
def serial(model, scans, tmp_path_factory):
    out = tmp_path_factory.mktemp("serial") / "worklist"
    rows = run_screening([str(scans)], out, options(model), workers=1)
    return out, rows


def test_screening_writes_a_ranked_worklist_with_one_results_folder_per_scan(serial, scans):
    out, rows = serial
    done = [r for r in rows if r.status == "done"]
    assert len(done) == 4 and [r.rank for r in done] == [1, 2, 3, 4]
    assert [r.volume_score for r in done] == sorted((r.volume_score for r in done), reverse=True)
    failed = [r for r in rows if r.status == "failed"]
    assert [r.id for r in failed] == ["corrupt"] and "cannot read" in failed[0].error and failed[0].rank is None
    for r in done:
        summary = json.loads((out / r.id / "summary.json").read_text())
        assert summary["screening"]["sha256"] == r.sha256
        assert 0 <= r.scan_percentile <= 100 and r.top_slice is not None and r.segmented_ml >= 0
        # the worklist counts the scan's findings and gives the largest one's volume
        assert r.findings == len(summary["findings"]) and (out / r.id / "findings.csv").is_file()
        assert r.largest_finding_ml == max((f["volume_ml"] for f in summary["findings"]), default=None)
        png = sitk.ReadImage(str(out / r.id / "thumbnail.png"))
        assert png.GetNumberOfComponentsPerPixel() == 3 and png.GetSize()[1] == 160
    with open(out / "worklist.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [t["id"] for t in table] == [r.id for r in rows] and table[0]["rank"] == "1"
    assert {"findings", "largest_finding_ml"} <= set(table[0])
    page = (out / "worklist.html").read_text()
    assert all(r.id in page for r in rows) and page.count("thumbnail.png") == 4 and "http" not in page
    assert read_worklist(out / "worklist.csv").rows == rows


def test_each_scan_is_scored_exactly_as_score_scores_it(serial, scans, model, tmp_path):
    out, rows = serial
    assert score_file(str(scans / "a" / "lesion.nii.gz"), str(tmp_path / "one"), str(model.path), ["dae"],
                      quiet=True) == 0
    alone, screened = read_results(tmp_path / "one"), read_results(out / "lesion")
    np.testing.assert_array_equal(alone.maps["dae"], screened.maps["dae"])
    assert alone.summary["volume_score"] == screened.summary["volume_score"]


def test_an_interrupted_screening_resumes_and_skips_what_is_done(model, scans, tmp_path):
    out = tmp_path / "worklist"
    calls = []

    def stop_after_two(fraction, message):
        if message.startswith("screened"):
            calls.append(message)
            if len(calls) == 2:
                raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        run_screening([str(scans)], out, options(model), workers=1, progress=stop_after_two)
    record = json.loads((out / "worklist.json").read_text())
    assert record["counts"] == {"done": 1, "failed": 1, "pending": 3}  # corrupt fails first, then one scan
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # nothing half-written
    first = next(r for r in record["rows"] if r["status"] == "done")["id"]
    stamp = os.stat(out / first / "summary.json").st_mtime_ns

    rows, jobs = plan(find_scans([str(scans)], exclude=out)[0], out, options(model), retry_failed=False)
    assert sorted(s.id for s, _, _ in jobs) == ["lesion", "other", "series1"]
    rows = run_screening([str(scans)], out, options(model), workers=1)
    assert [r.status for r in rows].count("done") == 4
    assert os.stat(out / first / "summary.json").st_mtime_ns == stamp  # skipped, not redone
    _, jobs = plan(find_scans([str(scans)], exclude=out)[0], out, options(model), retry_failed=True)
    assert [s.id for s, _, _ in jobs] == ["corrupt"]  # failed scans are redone on request only


def test_a_changed_scan_is_screened_again(model, scans, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    sitk.WriteImage(image_from(phantom_array(SHAPE, seed=21)), str(data / "s.nii.gz"))
    out = tmp_path / "worklist"
    first = run_screening([str(data)], out, options(model), workers=1)[0]
    sitk.WriteImage(image_from(phantom_array(SHAPE, lesion=True, seed=21)), str(data / "s.nii.gz"))
    assert len(plan(find_scans([str(data)])[0], out, options(model), False)[1]) == 1
    second = run_screening([str(data)], out, options(model), workers=1)[0]
    assert second.sha256 != first.sha256 and second.volume_score != first.volume_score


def test_a_worklist_made_with_other_options_is_resumed_only_when_forced(model, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    sitk.WriteImage(image_from(phantom_array(SHAPE, seed=22)), str(data / "s.nii.gz"))
    out = tmp_path / "worklist"
    first = run_screening([str(data)], out, options(model), workers=1)[0]
    other = ScreenOptions(str(model.path), model.name, model.manifest_sha256, ("dae",), threshold_level=2.0)
    with pytest.raises(InputError, match="other threshold_level"):
        run_screening([str(data)], out, other, workers=1)
    assert read_worklist(out).rows[0].sha256 == first.sha256  # nothing changed
    again = run_screening([str(data)], out, other, workers=1, force=True)[0]
    assert again.sha256 != first.sha256 and again.status == "done"


def test_a_local_cluster_of_two_workers_gives_the_serial_worklist(serial, model, scans, tmp_path):
    pytest.importorskip("distributed")
    out, rows = serial
    parallel = run_screening([str(scans)], tmp_path / "parallel", options(model), workers=2)
    assert [(r.id, r.status, r.rank, r.top_slice, r.sha256) for r in parallel] == \
        [(r.id, r.status, r.rank, r.top_slice, r.sha256) for r in rows]
    assert main(["compare-worklists", str(out), str(tmp_path / "parallel")]) == 0
    for a, b in zip(parallel, rows):
        if a.status == "done":
            assert a.volume_score == pytest.approx(b.volume_score, rel=1e-4)
            assert a.segmented_ml == pytest.approx(b.segmented_ml, rel=1e-3, abs=0.2)


def test_the_command_refuses_bad_inputs_before_any_work(model, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["screen", str(empty), "--out", str(tmp_path / "w"), "--model", str(model.path), "--workers", "1"]) == 2
    assert "no scans found" in capsys.readouterr().err
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("x")
    assert main(["screen", str(empty), "--out", str(tmp_path / "taken"), "--model", str(model.path)]) == 2
    assert "holds other files" in capsys.readouterr().err and (tmp_path / "taken" / "mine.txt").exists()
    assert main(["screen", str(tmp_path / "nope"), "--out", str(tmp_path / "w2"), "--model", str(model.path)]) == 2
    assert "does not exist" in capsys.readouterr().err
