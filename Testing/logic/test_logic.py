"""AnomalyLocalizerLogic end to end in a real MRML scene (slicer-core), tiny model, phantom."""

import json

import numpy as np
import pytest
import SimpleITK as sitk

from logic_helpers import engine, segmentArray, slicer, vtk
from AnomalyLocalizerLib.logic import AnomalyLocalizerLogic, volumeNodeToImage

from anomaly_localizer.errors import AnomalyLocalizerError, InputError

make_tiny_package, image_from = engine.make_tiny_package, engine.image_from
phantom_array, rotation = engine.phantom_array, engine.rotation
CALIBRATION = engine.TINY_CALIBRATION


@pytest.fixture()
def model(tmp_path):
    return make_tiny_package(tmp_path / "models" / "tiny", calibration=CALIBRATION)


def _load(slicerApp, tmp_path, direction=(1, 0, 0, 0, 1, 0, 0, 0, 1), spacing=(4.0, 4.0, 4.0), lesion=True):
    img = image_from(phantom_array(lesion=lesion), spacing=spacing, direction=direction, origin=(-20.0, 31.0, -7.5))
    path = tmp_path / "scan.nrrd"
    sitk.WriteImage(img, str(path))
    return img, slicerApp.loadVolume(path, "scan")


def _geometry(node):
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)]), node.GetImageData().GetDimensions()


def test_volume_node_becomes_the_same_image_the_file_holds(slicerApp, tmp_path):
    img, node = _load(slicerApp, tmp_path, direction=rotation(0.2, -0.1, 0.3), spacing=(3.0, 4.0, 5.0))
    back = volumeNodeToImage(node)
    assert back.GetSize() == img.GetSize()
    np.testing.assert_allclose(back.GetOrigin(), img.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(back.GetDirection(), img.GetDirection(), atol=1e-6)
    np.testing.assert_allclose(back.GetSpacing(), img.GetSpacing(), atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(img))


@pytest.mark.parametrize("direction", [(1, 0, 0, 0, 1, 0, 0, 0, 1), rotation(0.3, 0.15, -0.2)])
def test_run_creates_every_output_on_the_inputs_geometry(slicerApp, tmp_path, model, direction):
    slicerApp.addSliceView("Red")
    img, scan = _load(slicerApp, tmp_path, direction=direction)
    logic = AnomalyLocalizerLogic(slicerApp.app)
    result = logic.run(scan, model=str(model.path), methods=["combi", "rec"])
    geometry = _geometry(scan)
    for role in ("heatmap.combi", "heatmap.rec", "labelmap"):
        node = logic.outputNode(scan, role)
        assert node is not None, role
        g = _geometry(node)
        np.testing.assert_allclose(g[0], geometry[0], atol=1e-6)
        assert g[1] == geometry[1]
    heat = logic.outputNode(scan, "heatmap.combi")
    display = heat.GetDisplayNode()
    assert display.GetColorNode().GetName() == "AnomalyLocalizerHeat"
    assert (display.GetWindow(), display.GetLevel()) == pytest.approx((1.0, 0.5))
    assert display.GetApplyThreshold()
    seg = logic.outputNode(scan, "segmentation")
    assert seg.GetSegmentation().GetSegmentIdBySegmentName("Anomaly")
    table = logic.outputNode(scan, "table")
    assert table.GetNumberOfRows() == img.GetSize()[2]
    assert table.GetTable().GetColumnByName("elbo_healthy_percentile") is not None
    assert logic.outputNode(scan, "plot").GetNumberOfPlotSeriesNodes() == 1
    composite = slicerApp.scene.GetNodesByClass("vtkMRMLSliceCompositeNode").GetItemAsObject(0)
    assert composite.GetBackgroundVolumeID() == scan.GetID()
    assert composite.GetForegroundVolumeID() == heat.GetID()
    # outputs sit in a folder beside the input in the subject hierarchy
    sh = slicerApp.scene.GetSubjectHierarchyNode()
    folder = sh.GetItemParent(sh.GetItemByDataNode(heat))
    assert sh.GetItemName(folder) == "scan anomalies"
    assert sh.GetItemParent(folder) == sh.GetItemParent(sh.GetItemByDataNode(scan))
    # anomaly level: raw score / the 0.01 % threshold (0.05 in the test calibration)
    raw = result.maps["combi"]
    np.testing.assert_allclose(slicer.util.arrayFromVolume(heat), raw / 0.05, rtol=1e-6)


def test_threshold_moves_the_segment(slicerApp, tmp_path, model):
    _, scan = _load(slicerApp, tmp_path)
    logic = AnomalyLocalizerLogic(slicerApp.app)
    result = logic.run(scan, model=str(model.path), methods=["rec"])
    raw = result.maps["rec"]
    levels = np.quantile(raw[result.brainMask] / 0.05, [0.5, 0.9])
    counts = []
    for level in levels:
        n = logic.setThreshold(float(level))
        label = slicer.util.arrayFromVolume(logic.outputNode(scan, "labelmap"))
        expected = (raw > level * 0.05) & result.brainMask
        np.testing.assert_array_equal(label > 0, expected)
        assert n == expected.sum()
        seg = logic.outputNode(scan, "segmentation")
        np.testing.assert_array_equal(segmentArray(slicerApp, seg, "Anomaly", scan) > 0, expected)
        counts.append(n)
    assert counts[0] > counts[1] > 0
    fpr = logic.healthyFalsePositiveRate()
    assert fpr is not None and 0 < fpr < 1


def test_broad_flag_note_follows_the_threshold(slicerApp, tmp_path):
    """Healthy brains put 0.01 % of their voxels above anomaly level 1 (tiny raw thresholds
    here); this scan puts most of its brain there: the note says so, and goes away at a
    threshold that flags nothing or one that flags as much of healthy brains."""
    calib = {"default_fpr": 0.001, "pixel": {"rec": {"n_subjects": 3, "thresholds": [
        {"fpr": 0.001, "value": 3e-9}, {"fpr": 0.0001, "value": 4e-9}],
        "curve": {"fpr": [0.1, 0.01, 0.001, 0.0001], "values": [1e-9, 2e-9, 3e-9, 4e-9]}}}}
    pkg = make_tiny_package(tmp_path / "models" / "low", calibration=calib)
    _, scan = _load(slicerApp, tmp_path)
    logic = AnomalyLocalizerLogic(slicerApp.app)
    logic.run(scan, model=str(pkg.path), methods=["rec"])
    flagged = logic.setThreshold(1.0)
    assert flagged / logic.result.brainMask.sum() > 0.5
    assert logic.healthyFalsePositiveRate() == pytest.approx(0.0001)
    assert "recalibrate" in logic.broadFlagNote()
    assert logic.setThreshold(1e12) == 0 and logic.broadFlagNote() is None
    with pytest.raises(InputError, match="threshold level"):  # not a level: refused, the segment kept
        logic.setThreshold(-1.0)
    assert logic.threshold == 1e12
    logic.setThreshold(1e-6)  # the whole brain, below the calibrated range: no healthy rate is invented
    assert logic.healthyFalsePositiveRate() is None and logic.broadFlagNote() is None


def test_a_scan_relative_map_raised_overall_is_said_as_context_under_the_threshold(slicerApp, tmp_path):
    """A map made relative to the scan's own median hides how raised it is overall; when it is
    raised far beyond every healthy calibration scan's (tiny healthy references here), a line
    under the threshold says so as the scan's context (not as the segmentation's note, which is
    for broad flags), in this process and from a child run alike."""
    from anomaly_localizer.core.package import load_package, update_meta
    calib = {"default_fpr": 0.001, "pixel": {"rec": {"n_subjects": 3, "thresholds": [
        {"fpr": 0.001, "value": 3.0}, {"fpr": 0.0001, "value": 5.0}],
        "curve": {"fpr": [0.1, 0.01, 0.001, 0.0001], "values": [1.0, 2.0, 3.0, 5.0]}}},
        "scan_reference": {"rec": [1e-9, 2e-9, 3e-9]}}
    pkg = make_tiny_package(tmp_path / "models" / "rel", calibration=calib)
    meta = dict(pkg.meta, scan_relative={"rec": {"quantile": 0.5}})
    update_meta(pkg.path, meta)
    pkg = load_package(pkg.path)
    _, scan = _load(slicerApp, tmp_path)
    logic = AnomalyLocalizerLogic(slicerApp.app)
    result = logic.run(scan, model=str(pkg.path), methods=["rec"])
    assert np.median(result.maps["rec"][result.brainMask]) == pytest.approx(1.0, rel=1e-3)
    assert logic.setThreshold(1e6) == 0  # nothing flagged: no broad-flag note, the scan's note stays
    assert "times as high overall" in logic.scanContextNote() and logic.thresholdNote() is None
    assert logic.scanContextNote() in logic.thresholdInfoText(0) and "Note:" not in logic.thresholdInfoText(0)
    child = AnomalyLocalizerLogic(slicerApp.app)
    child.finishRun(child.startRun(scan, model=str(pkg.path), methods=["rec"]))
    child.setThreshold(1e6)
    assert child.scanContextNote() == logic.scanContextNote()


def test_rerun_reuses_nodes(slicerApp, tmp_path, model):
    _, scan = _load(slicerApp, tmp_path)
    logic = AnomalyLocalizerLogic(slicerApp.app)
    logic.run(scan, model=str(model.path), methods=["rec"])
    before = slicerApp.nodeCount()
    ids = {r: logic.outputNode(scan, r).GetID() for r in ("heatmap.rec", "labelmap", "segmentation", "table", "plot")}
    logic.run(scan, model=str(model.path), methods=["rec"])
    assert slicerApp.nodeCount() == before
    assert ids == {r: logic.outputNode(scan, r).GetID() for r in ids}


def test_rerun_with_another_model_removes_the_heatmaps_it_did_not_make(slicerApp, tmp_path, model):
    """After a rerun the folder holds one run's outputs: the first model's heatmaps do not
    stay beside the second model's segmentation and table looking current."""
    lsr = engine.make_tiny_lsr_package(tmp_path / "models" / "tiny-lsr")
    _, scan = _load(slicerApp, tmp_path)
    logic = AnomalyLocalizerLogic(slicerApp.app)
    logic.run(scan, model=str(model.path), methods=["rec", "elbo_grad"])
    old = [logic.outputNode(scan, f"heatmap.{m}").GetID() for m in ("rec", "elbo_grad")]
    logic.run(scan, model=str(lsr.path))
    assert logic.outputNode(scan, "heatmap.lsr") is not None
    assert logic.outputNode(scan, "heatmap.rec") is None and logic.outputNode(scan, "heatmap.elbo_grad") is None
    assert all(slicerApp.scene.GetNodeByID(i) is None for i in old)
    # a rerun that fails keeps the last good run's heatmap
    with pytest.raises(AnomalyLocalizerError):
        logic.run(scan, model=str(model.path), methods=["no_such_method"])
    assert logic.outputNode(scan, "heatmap.lsr") is not None


def _loadAllZero(slicerApp, tmp_path):
    sitk.WriteImage(image_from(np.zeros((20, 20, 20), np.float32)), str(tmp_path / "zero.nrrd"))
    return slicerApp.loadVolume(tmp_path / "zero.nrrd", "zero")


def test_bad_input_leaves_the_scene_as_it_was_and_says_why(slicerApp, tmp_path, model):
    scan = _loadAllZero(slicerApp, tmp_path)
    logic = AnomalyLocalizerLogic(slicerApp.app)
    before = slicerApp.nodeCount()
    with pytest.raises(AnomalyLocalizerError, match="all zero"):
        logic.run(scan, model=str(model.path))
    assert slicerApp.nodeCount() == before
    with pytest.raises(AnomalyLocalizerError, match="unknown model"):
        logic.run(scan, model="no-such-model")
    assert slicerApp.nodeCount() == before


def test_mask_as_label_map_or_segmentation(slicerApp, tmp_path, model):
    img, scan = _load(slicerApp, tmp_path)
    arr = sitk.GetArrayFromImage(img)
    half = (arr != 0).astype(np.uint8)
    half[:, :, : half.shape[2] // 2] = 0
    m = sitk.GetImageFromArray(half)
    m.CopyInformation(img)
    sitk.WriteImage(m, str(tmp_path / "mask.nrrd"))
    maskNode = slicerApp.loadVolume(tmp_path / "mask.nrrd", "mask", labelmap=True)
    logic = AnomalyLocalizerLogic(slicerApp.app)
    r1 = logic.run(scan, model=str(model.path), methods=["rec"], mask=maskNode)
    np.testing.assert_array_equal(r1.brainMask, half > 0)
    segNode = slicerApp.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "brain")
    slicerApp.logics["Segmentations"].ImportLabelmapToSegmentationNode(maskNode, segNode)
    r2 = logic.run(scan, model=str(model.path), methods=["rec"], mask=segNode)
    np.testing.assert_array_equal(r2.brainMask, half > 0)


def test_child_process_run_matches_the_in_process_run(slicerApp, tmp_path, model):
    _, scan = _load(slicerApp, tmp_path)
    logic = AnomalyLocalizerLogic(slicerApp.app)
    run = logic.startRun(scan, model=str(model.path), methods=["combi"])
    result = logic.finishRun(run)
    assert run.progress == pytest.approx(1.0)
    assert not run.work_dir.exists()  # temporary files removed
    direct = AnomalyLocalizerLogic(slicerApp.app).run(scan, model=str(model.path), methods=["combi"])
    np.testing.assert_allclose(result.maps["combi"], direct.maps["combi"], rtol=1e-5, atol=1e-7)


def test_cancelled_run_leaves_the_scene_as_it_was(slicerApp, tmp_path, model):
    _, scan = _load(slicerApp, tmp_path)
    logic = AnomalyLocalizerLogic(slicerApp.app)
    before = slicerApp.nodeCount()
    run = logic.startRun(scan, model=str(model.path))
    run.cancel()
    with pytest.raises(AnomalyLocalizerError, match="cancelled"):
        logic.finishRun(run)
    assert slicerApp.nodeCount() == before
    assert not run.work_dir.exists()
    assert logic.outputNode(scan, "labelmap") is None


def test_failed_child_run_reports_the_engines_message(slicerApp, tmp_path, model):
    scan = _loadAllZero(slicerApp, tmp_path)
    logic = AnomalyLocalizerLogic(slicerApp.app)
    before = slicerApp.nodeCount()
    with pytest.raises(AnomalyLocalizerError, match="all zero"):
        logic.finishRun(logic.startRun(scan, model=str(model.path)))
    assert slicerApp.nodeCount() == before


def test_jump_to_the_worst_slice(slicerApp, tmp_path, model):
    sliceLogic = slicerApp.addSliceView("Red")
    img, scan = _load(slicerApp, tmp_path)
    logic = AnomalyLocalizerLogic(slicerApp.app)
    logic.run(scan, model=str(model.path), methods=["rec"])
    k = logic.worstSlice()
    elbo = logic.result.sliceScores["elbo"]
    assert k == int(np.nanargmax(elbo))
    ras = logic.jumpToSlice(k)
    offset = sliceLogic.GetSliceNode().GetSliceOffset()
    # axial slice k of this LPS-aligned volume sits at S = origin_z + k * spacing
    assert offset == pytest.approx(-7.5 + 4.0 * k, abs=1e-3)
    assert ras[2] == pytest.approx(offset, abs=1e-3)


def test_export_round_trip(slicerApp, tmp_path, model):
    _, scan = _load(slicerApp, tmp_path)
    logic = AnomalyLocalizerLogic(slicerApp.app)
    logic.run(scan, model=str(model.path), methods=["rec"])
    logic.setThreshold(0.3)
    label = slicer.util.arrayFromVolume(logic.outputNode(scan, "labelmap")).copy()
    nii = logic.exportSegmentation(tmp_path / "anomaly.nii.gz")
    back = sitk.ReadImage(str(nii))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), label)
    np.testing.assert_allclose(back.GetOrigin(), volumeNodeToImage(scan).GetOrigin(), atol=1e-4)
    prov = json.loads((tmp_path / "anomaly.nii.gz.json").read_text())
    assert prov["method"] == "rec" and prov["threshold_anomaly_level"] == 0.3 and prov["model"]["name"] == "tiny"
    assert prov["brain_mask_source"].startswith("non-zero region")
    seg = logic.exportSegmentation(tmp_path / "anomaly.seg.nrrd")
    segBack = slicerApp.scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = slicer.vtkMRMLSegmentationStorageNode()
    slicerApp.scene.AddNode(storage)
    storage.SetFileName(str(seg))
    assert storage.ReadData(segBack)
    np.testing.assert_array_equal(segmentArray(slicerApp, segBack, "Anomaly", scan) > 0, label > 0)
    csvPath = logic.exportSliceScores(tmp_path / "scores.csv")
    lines = csvPath.read_text().splitlines()
    assert lines[0].startswith("# ") and json.loads(lines[0][2:])["method"] == "rec"
    header = lines[1].split(",")
    assert header[0] == "slice" and {"elbo", "kl", "rec", "elbo_healthy_percentile"} <= set(header)
    assert len(lines) == 2 + 30  # one row per axial slice (k, 30 of them)
    with pytest.raises(FileExistsError):
        logic.exportSliceScores(tmp_path / "scores.csv")


def test_lsr_model_runs_in_the_scene_with_its_own_slice_score(slicerApp, tmp_path):
    """The LSR model through both paths (in process and child process): heatmap, table
    column, plot and worst slice all use its lsr slice score."""
    lsr = engine.make_tiny_lsr_package(tmp_path / "models" / "tiny-lsr")
    slicerApp.addSliceView("Red")
    _, scan = _load(slicerApp, tmp_path)
    logic = AnomalyLocalizerLogic(slicerApp.app)
    result = logic.run(scan, model=str(lsr.path))
    assert list(result.maps) == ["lsr"] and logic.method == "lsr"
    assert logic.outputNode(scan, "heatmap.lsr") is not None
    table = logic.outputNode(scan, "table").GetTable()
    assert table.GetColumnByName("lsr") is not None and table.GetColumnByName("elbo") is None
    assert "LSR" in logic.outputNode(scan, "plot").GetYAxisTitle()
    assert logic.worstSlice() == int(np.nanargmax(result.sliceScores["lsr"]))
    child = logic.finishRun(logic.startRun(scan, model=str(lsr.path)))
    np.testing.assert_allclose(child.maps["lsr"], result.maps["lsr"], rtol=1e-5, atol=1e-6)
    assert child.summary["primary_slice_score"] == "lsr"
    assert logic.worstSlice() == int(np.nanargmax(child.sliceScores["lsr"]))


@pytest.fixture()
def quickRestoration(tmp_path):
    """The tiny model with a short restoration (15 steps): what these tests check does not need
    the default 150, which a 2-core machine takes half a minute over."""
    from anomaly_localizer.core.package import load_package, update_meta
    pkg = make_tiny_package(tmp_path / "models" / "tiny-quick", calibration=CALIBRATION)
    update_meta(pkg.path, {**pkg.meta, "restoration": {"steps": 15}})
    return load_package(pkg.path)


def test_restoration_is_added_on_request_for_models_that_offer_it(slicerApp, tmp_path, quickRestoration):
    model = quickRestoration
    logic = AnomalyLocalizerLogic(slicerApp.app)
    assert "restoration" not in logic.methodsFor(str(model.path))
    methods = logic.methodsFor(str(model.path), includeRestoration=True)
    assert methods[-1] == "restoration"
    lsr = engine.make_tiny_lsr_package(tmp_path / "models" / "tiny-lsr")
    assert logic.methodsFor(str(lsr.path), includeRestoration=True) == ["lsr"]
    _, scan = _load(slicerApp, tmp_path)
    result = logic.run(scan, model=str(model.path), methods=["rec", "restoration"])
    assert set(result.maps) == {"rec", "restoration"}
    assert logic.outputNode(scan, "heatmap.restoration") is not None


def test_the_progress_of_a_child_run_rises_through_intermediate_values(slicerApp, tmp_path, quickRestoration):
    import time
    model = quickRestoration
    _, scan = _load(slicerApp, tmp_path)
    logic = AnomalyLocalizerLogic(slicerApp.app)
    run = logic.startRun(scan, model=str(model.path), methods=["rec", "restoration"])
    seen = []
    while run.poll() == "running":
        seen.append(run.progress)
        time.sleep(0.01)
    logic.finishRun(run)
    middle = sorted({p for p in seen if 0.0 < p < 1.0})
    assert len(middle) >= 3, seen[-5:]  # the bar moves during the run, not only at its end
    assert seen == sorted(seen)  # and only forward


def test_a_rerun_failing_while_building_nodes_restores_the_reused_ones(slicerApp, tmp_path, model, monkeypatch):
    _, scan = _load(slicerApp, tmp_path)
    logic = AnomalyLocalizerLogic(slicerApp.app)
    logic.run(scan, model=str(model.path), methods=["rec", "combi"])
    heat = {m: np.array(slicer.util.arrayFromVolume(logic.outputNode(scan, f"heatmap.{m}")), copy=True)
            for m in ("rec", "combi")}
    label = np.array(slicer.util.arrayFromVolume(logic.outputNode(scan, "labelmap")), copy=True)
    rows = logic.outputNode(scan, "table").GetNumberOfRows()
    threshold, before = logic.threshold, slicerApp.nodeCount()
    calls = []

    def fail_on_second(self, node):
        calls.append(node)
        if len(calls) == 2:  # after the first heatmap's voxels were overwritten
            raise RuntimeError("VTK failed")
    monkeypatch.setattr(type(logic), "_styleHeatmap", fail_on_second)
    other = make_tiny_package(tmp_path / "models" / "other", seed=5, calibration=CALIBRATION)
    with pytest.raises(RuntimeError):
        logic.run(scan, model=str(other.path), methods=["rec", "combi"])
    for m in heat:
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(logic.outputNode(scan, f"heatmap.{m}")), heat[m])
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(logic.outputNode(scan, "labelmap")), label)
    assert logic.outputNode(scan, "table").GetNumberOfRows() == rows
    assert logic.threshold == threshold and slicerApp.nodeCount() == before


def test_a_broken_model_is_skipped_in_the_model_list(tmp_path, model, monkeypatch):
    from anomaly_localizer.core.package import write_manifest
    bad = make_tiny_package(tmp_path / "models" / "bad")
    (bad.path / "model.json").write_text("{broken")
    write_manifest(bad.path)
    monkeypatch.setenv("ANOMALY_LOCALIZER_MODELS", str(tmp_path / "models"))
    names = [m["name"] for m in AnomalyLocalizerLogic.availableModels()]
    assert "tiny" in names and "bad" not in names


def test_a_new_detector_family_reaches_the_scene_without_edits(slicerApp, tmp_path):
    dae = engine.make_tiny_dae_package(tmp_path / "models" / "tiny-dae")
    _, scan = _load(slicerApp, tmp_path)
    logic = AnomalyLocalizerLogic(slicerApp.app)
    result = logic.run(scan, model=str(dae.path))
    assert set(result.maps) == {"dae"} and logic.method == "dae"
    assert logic.outputNode(scan, "heatmap.dae") is not None and logic.worstSlice() is not None
    table = logic.outputNode(scan, "table")
    assert table.GetTable().GetColumnByName("dae") is not None


def test_a_fused_model_shows_its_map_first_with_every_component_one_click_away(slicerApp, tmp_path, monkeypatch):
    from anomaly_localizer.tooling.release.fusion import make_fused
    calib = {"default_fpr": 0.001, "pixel": {m: CALIBRATION["pixel"]["rec"] for m in ("dae", "ssl")}}
    engine.make_tiny_dae_package(tmp_path / "models" / "tiny-dae", calibration=calib)
    engine.make_tiny_ssl_package(tmp_path / "models" / "tiny-ssl", calibration=calib)
    monkeypatch.setenv("ANOMALY_LOCALIZER_MODELS", str(tmp_path / "models"))
    fused = make_fused(["tiny-dae:dae", "tiny-ssl:ssl"], tmp_path / "models" / "tiny-fused", None, rule="mean")
    _, scan = _load(slicerApp, tmp_path)
    logic = AnomalyLocalizerLogic(slicerApp.app)
    assert logic.methodsFor(str(fused.path)) == ["fused", "dae", "ssl"]
    result = logic.run(scan, model=str(fused.path))
    assert list(result.maps) == ["fused", "dae", "ssl"] and logic.method == "fused"
    assert result.summary["fusion"]["rule"] == "mean"
    for m in ("fused", "dae", "ssl"):
        assert logic.outputNode(scan, f"heatmap.{m}") is not None
    logic.setMethod("dae")
    assert logic.method == "dae" and logic.worstSlice() is not None


def test_the_in_app_tests_whole_flow_runs_headless(slicerApp, tmp_path, monkeypatch):
    """The module's in-app test follows AnomalyLocalizerLib.selfcheck.wholeFlow inside Slicer on
    a real scan; the same flow here, on the phantom with tiny models (a VAE with restoration
    and an LSR model) as the only installed ones."""
    from AnomalyLocalizerLib.selfcheck import wholeFlow
    make_tiny_package(tmp_path / "models" / "tiny", calibration=CALIBRATION)
    engine.make_tiny_lsr_package(tmp_path / "models" / "tiny-lsr")
    monkeypatch.setenv("ANOMALY_LOCALIZER_MODELS", str(tmp_path / "models"))
    monkeypatch.setattr("anomaly_localizer.core.package.SHIPPED_MODELS_DIRS", ())
    monkeypatch.setattr("anomaly_localizer.core.package.USER_MODELS_DIR", tmp_path / "no-user-models")
    slicerApp.addSliceView("Red")
    _, scan = _load(slicerApp, tmp_path)
    said = []
    wholeFlow(AnomalyLocalizerLogic(slicerApp.app), scan, say=said.append)
    assert said == ["Scoring", "Restoration and latent space restoration"]
