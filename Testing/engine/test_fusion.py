"""The fused default map: component maps of other packages, each in its healthy anomaly
levels, combined by a rule chosen on validation cases, calibrated like any map."""

import json
import os

import numpy as np
import pytest
from phantoms import healthy_folder, image_from, make_tiny_dae_package, make_tiny_ssl_package, phantom_array

from anomaly_localizer.cli import main
from anomaly_localizer.core.fusion import fuse_levels, standardised_slice_scores, top_area_slice_scores
from anomaly_localizer.core.levels import level_scale
from anomaly_localizer.core.package import load_package
from anomaly_localizer.core.package import resolve_package
from anomaly_localizer.core.pipeline import score_volume
from anomaly_localizer.errors import InputError, PackageError
from anomaly_localizer.tooling.release.calibrate import calibrate_package
from anomaly_localizer.tooling.data import find_subjects
from anomaly_localizer.tooling.release.fusion import choose_rule, choose_slice_score, make_fused


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Two calibrated tiny component models in a models folder, and healthy phantoms."""
    root = tmp_path_factory.mktemp("fusion")
    data = healthy_folder(root / "healthy", n=6)
    subjects = find_subjects(data)
    split = {"train": [], "val": [s.id for s in subjects[:2]], "calibration": [s.id for s in subjects[2:4]],
             "test": [s.id for s in subjects[4:]]}
    models = root / "models"
    comps = []
    for make, name in ((make_tiny_dae_package, "tiny-dae"), (make_tiny_ssl_package, "tiny-ssl")):
        pkg = make(models / name)
        meta = dict(pkg.meta)
        meta["provenance"] = {"subjects": split}
        from anomaly_localizer.core.package import update_meta
        update_meta(pkg.path, meta)
        comps.append(calibrate_package(load_package(pkg.path), subjects[2:4]))
    old = os.environ.get("ANOMALY_LOCALIZER_MODELS")
    os.environ["ANOMALY_LOCALIZER_MODELS"] = str(models)
    yield {"root": root, "data": data, "models": models, "comps": comps}
    if old is None:
        os.environ.pop("ANOMALY_LOCALIZER_MODELS")
    else:
        os.environ["ANOMALY_LOCALIZER_MODELS"] = old


@pytest.fixture(scope="module")
def fused(world):
    return make_fused(["tiny-dae:dae", "tiny-ssl:ssl"], world["models"] / "tiny-fused", str(world["data"]),
                      rule="mean")


def test_a_fused_package_offers_its_map_first_and_every_component(fused):
    assert fused.methods == ("fused", "dae", "ssl") and fused.default_methods()[0] == "fused"
    assert fused.primary_slice_score == "fused" and not (fused.path / "model.safetensors").exists()
    assert {"fused", "dae", "ssl"} <= set(fused.calibration.pixel)  # calibrated like any model
    assert fused.meta["provenance"]["subjects"]["calibration"] == fused.calibration.subjects


def test_the_fused_map_is_the_rule_applied_to_the_component_levels(fused, world):
    image = image_from(phantom_array(lesion=True))
    res = score_volume(image, fused, device="cpu")
    assert list(res.maps) == ["fused", "dae", "ssl"]
    dae, ssl = (resolve_package(n) for n in ("tiny-dae", "tiny-ssl"))
    expected = 0.5 * (res.maps["dae"] / level_scale(dae.calibration, "dae")[0] +
                      res.maps["ssl"] / level_scale(ssl.calibration, "ssl")[0])
    brain = res.brain_mask
    assert np.allclose(res.maps["fused"][brain], expected[brain], rtol=1e-5, atol=1e-6)
    assert (res.maps["fused"][~brain] == 0).all()
    # each component as it scores alone (the same brain mask, the same smoothing)
    alone = score_volume(image, dae, ["dae"], device="cpu")
    assert np.allclose(alone.maps["dae"], res.maps["dae"], atol=1e-6)
    assert res.info["fusion"]["rule"] == "mean" and {c["model"] for c in res.info["fusion"]["components"]} == \
        {"tiny-dae", "tiny-ssl"}
    assert np.isfinite(res.volume_score) and res.info["primary_slice_score"] == "fused"


def test_rules_combine_levels_voxel_by_voxel():
    a, b = np.array([1.0, 4.0]), np.array([3.0, 0.0])
    assert np.allclose(fuse_levels([a, b], "mean", [1, 1]), [2.0, 2.0])
    assert np.allclose(fuse_levels([a, b], "max", [1, 1]), [3.0, 4.0])
    assert np.allclose(fuse_levels([a, b], "weighted", [3, 1]), [1.5, 3.0])


def test_slice_scores_use_the_same_area_whatever_the_resolution():
    brain = np.ones((2, 10, 10), bool)
    fused = np.zeros((2, 10, 10), np.float32)
    fused[1, :2, :] = 5.0  # 20 voxels of 4 mm^2 = 80 mm^2
    s = top_area_slice_scores(fused, brain, 0, (2.0, 2.0, 2.0))
    assert s[0] == 0 and s[1] == pytest.approx(5.0)
    s1 = top_area_slice_scores(fused, brain, 0, (1.0, 1.0, 1.0))  # 80 voxels: a quarter at 5
    assert s1[1] == pytest.approx(5.0 * 20 / 80)


def test_the_rule_is_chosen_on_validation_cases():
    rng = np.random.default_rng(0)
    label = np.zeros(2000, bool)
    label[:100] = True
    good = rng.normal(size=2000) + 3 * label
    noise = rng.normal(size=2000)
    cases = [{"levels": {"good": good, "noise": noise}, "brain": np.ones(2000, bool), "label": label}]
    sel = choose_rule(cases, ["good", "noise"])
    # good alone, noise alone, both under mean and max, and both under weights (1, 0.5) and (1, 2)
    assert sel["chosen"]["methods"] == ["good"] and len(sel["table"]) == 1 + 1 + 2 + 2
    assert "validation" in sel["rule"]


def test_a_weighted_mean_is_chosen_when_it_serves_best_and_real_cases_count_in_the_choice():
    rng = np.random.default_rng(1)
    label = np.zeros(4000, bool)
    label[:200] = True
    strong = rng.normal(size=4000) + 2.5 * label
    weak = rng.normal(size=4000) + 1.0 * label  # informative, but half as much: a weight of 0.5 suits it
    cases = [{"levels": {"a": strong, "b": weak}, "brain": np.ones(4000, bool), "label": label}]
    sel = choose_rule(cases, ["a", "b"])
    assert sel["chosen"]["rule"] == "weighted" and sel["chosen"]["weights"] == [1.0, 0.5]
    # a real case on which only "b" finds the lesion pulls the choice towards "b"
    real = [{"id": "tumour", "levels": {"a": rng.normal(size=4000), "b": weak + 3.0 * label},
             "brain": np.ones(4000, bool), "label": label}]
    with_real = choose_rule(cases, ["a", "b"], real_cases=real)
    assert "tumour" in with_real["rule"] and "real_ap" in with_real["chosen"]
    chosen = with_real["chosen"]
    b_share = 1.0 if chosen["methods"] == ["b"] else (chosen["weights"][-1] / sum(chosen["weights"])
                                                       if chosen["rule"] == "weighted" else 0.5)
    assert b_share > 1 / 3  # more weight on "b" than the synthetic cases alone gave it (1 : 0.5)


def _slice_cases(rng, n_cases=6, n_slices=40):
    """Cases whose lesion slices a component's slice score "good" ranks well, "weak" a
    little, and the fused map's top area not at all (its map is noise)."""
    cases = []
    for i in range(n_cases):
        lesion = np.zeros(n_slices, int)
        lesion[10 + i: 16 + i] = 50
        pos = lesion > 0
        cases.append({"id": f"c{i}", "levels": {"m": rng.random((n_slices, 8, 8)).astype(np.float32)},
                      "brain": np.ones((n_slices, 8, 8), bool), "label": np.zeros((n_slices, 8, 8), bool),
                      "axial_axis": 0, "spacing_zyx": (2.0, 2.0, 2.0), "lesion_per_slice": lesion,
                      "brain_per_slice": np.full(n_slices, 64),
                      "slices": {("vae", "good"): rng.normal(size=n_slices) + 3 * pos,
                                 ("vae", "weak"): rng.normal(size=n_slices) + 0.5 * pos,
                                 ("other", "good2"): rng.normal(size=n_slices) + 3 * pos}})
    return cases


def test_the_slice_score_is_chosen_on_validation_slices_among_the_kept_components_scores():
    cases = _slice_cases(np.random.default_rng(0))
    chosen_rule = {"methods": ["m"], "rule": "mean", "weights": [1.0]}
    sel = choose_slice_score(cases, chosen_rule, {"vae"})
    assert sel["table"][0]["slice_score"] == "top area of the fused map" and sel["table"][0]["slice_auroc"] < 0.7
    assert sel["chosen"]["slice_auroc"] > 0.9 and sel["parts"][0] == {"model": "vae", "score": "good", "weight": 1.0}
    assert all(p["model"] == "vae" for row in sel["table"][1:] for p in row["slice_score"])  # "other" was dropped
    assert len(sel["table"]) == 1 + 2 + 3  # top area, each score, the pair under three weightings
    assert "slice AUROC" in sel["rule"]


def test_slice_scores_are_standardised_on_their_healthy_reference():
    levels, quantiles = [0.0, 50.0, 99.0, 100.0], [0.0, 10.0, 14.0, 30.0]
    assert np.allclose(standardised_slice_scores([10.0, 14.0, 6.0], levels, quantiles), [0.0, 1.0, -1.0])


def test_a_fused_slice_score_of_component_scores_is_their_standardised_weighted_mean(fused, tmp_path):
    import shutil
    from anomaly_localizer.core.package import update_meta
    path = tmp_path / "mixed"
    shutil.copytree(fused.path, path)
    meta = json.loads((path / "model.json").read_text())
    meta["architecture"]["slice_score"] = {"parts": [{"model": "tiny-dae", "score": "dae", "weight": 1.0},
                                                     {"model": "tiny-ssl", "score": "ssl", "weight": 3.0}]}
    update_meta(path, meta)
    pkg = load_package(path)
    res = score_volume(image_from(phantom_array(lesion=True)), pkg, device="cpu")
    dae, ssl = (resolve_package(n).calibration.slice for n in ("tiny-dae", "tiny-ssl"))
    expected = 0.25 * standardised_slice_scores(res.slice_scores["dae"], dae["dae"].levels, dae["dae"].values) + \
        0.75 * standardised_slice_scores(res.slice_scores["ssl"], ssl["ssl"].levels, ssl["ssl"].values)
    assert np.allclose(res.slice_scores["fused"], expected, rtol=1e-4, atol=1e-5, equal_nan=True)
    assert "0.75 x `ssl` of tiny-ssl" in res.info["volume_score_meaning"]
    meta["architecture"]["slice_score"]["parts"][0]["model"] = "tiny-vae"
    update_meta(path, meta)
    with pytest.raises(PackageError, match="slice_score names tiny-vae"):
        load_package(path)


def test_the_command_line_writes_the_fused_map_first_and_says_what_it_combines(fused, world):
    out = world["root"] / "out"
    assert main(["score", str(world["data"] / "t1" / "S05_T1.nii.gz"), "--model", "tiny-fused", "--out", str(out),
                 "-q"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["methods"][0] == "fused" and summary["threshold"]["method"] == "fused"
    assert summary["threshold"]["source"] == "calibrated" and summary["fusion"]["rule"] == "mean"
    assert [c["method"] for c in summary["fusion"]["components"]] == ["dae", "ssl"]
    assert all(c["raw_score_per_level"] > 0 for c in summary["fusion"]["components"])
    assert all((out / f"{m}.nii.gz").is_file() for m in ("fused", "dae", "ssl"))


def test_a_changed_component_is_refused_naming_it(world, tmp_path):
    pkg = make_fused(["tiny-dae:dae", "tiny-ssl:ssl"], tmp_path / "f", None, rule="max")
    meta = dict(pkg.meta)
    meta["architecture"]["components"][0]["content_sha256"] = "0" * 64
    from anomaly_localizer.core.package import update_meta
    update_meta(pkg.path, meta)
    with pytest.raises(PackageError, match="another version of tiny-dae"):
        score_volume(image_from(phantom_array()), load_package(pkg.path), device="cpu")


def test_bad_component_lists_are_refused_before_anything_is_written(world, tmp_path):
    with pytest.raises(InputError, match="MODEL:METHOD"):
        make_fused(["tiny-dae"], tmp_path / "a", None, rule="mean")
    with pytest.raises(InputError, match="does not offer"):
        make_fused(["tiny-dae:ssl"], tmp_path / "b", None, rule="mean")
    with pytest.raises(InputError, match="once"):
        make_fused(["tiny-dae:dae", "tiny-dae:dae"], tmp_path / "c", None, rule="mean")
    uncalibrated = make_tiny_dae_package(world["models"] / "raw-dae")
    with pytest.raises(InputError, match="no calibration"):
        make_fused([f"{uncalibrated.path}:dae"], tmp_path / "d", None, rule="mean")
    assert not any((tmp_path / n).exists() for n in "abcd")
    import shutil
    shutil.rmtree(uncalibrated.path)


def test_a_fused_model_json_is_validated_like_any_other(fused, tmp_path):
    import shutil
    from anomaly_localizer.core.package import update_meta
    copy = tmp_path / "copy"
    shutil.copytree(fused.path, copy)
    for bad, field in (({"rule": "median"}, "architecture.rule"),
                       ({"components": [{"model": "x", "method": "fused", "content_sha256": "0" * 64}]},
                        "own component"),
                       ({"components": []}, "architecture.components")):
        meta = json.loads(json.dumps(fused.meta))
        meta["architecture"].update(bad)
        update_meta(copy, meta)
        with pytest.raises(PackageError, match=field):
            load_package(copy)


def test_rule_auto_scores_validation_cases_and_records_the_choice(world, tmp_path):
    pkg = make_fused(["tiny-dae:dae", "tiny-ssl:ssl"], tmp_path / "auto", str(world["data"]), per_subject=1)
    record = pkg.meta["training"]["selection_record"]
    assert record["chosen"] in record["table"] and len(record["table"]) == 6 and "slice AUROC" in record["rule"]
    chosen = record["chosen"]
    assert pkg.architecture["rule"] == chosen["rule"] and pkg.calibration.pixel
    assert [c["method"] for c in pkg.architecture["components"]] == chosen["methods"]
    assert chosen["figure"] >= max(r["figure"] for r in record["table"]) - 1e-6
    slice_record = record["slice_score"]
    assert slice_record["chosen"]["figure"] >= max(r["figure"] for r in slice_record["table"]) - 1e-6
    mix = pkg.architecture.get("slice_score")
    assert (mix is None) == (slice_record["chosen"]["slice_score"] == "top area of the fused map")
    if chosen["rule"] == "weighted":
        assert [c["weight"] for c in pkg.architecture["components"]] == chosen["weights"]
    res = score_volume(image_from(phantom_array()), pkg, device="cpu")
    assert "fused" in res.maps


def test_commands_that_need_weights_or_own_maps_refuse_a_fused_model_with_advice(fused, world, tmp_path):
    from anomaly_localizer.tooling.release.edit import release_package
    from anomaly_localizer.tooling.release.tune_smoothing import tune_package
    with pytest.raises(InputError, match="fused model.*fuse"):
        release_package(fused.path, tmp_path / "r", str(world["data"]))
    with pytest.raises(InputError, match="fused model.*fuse"):
        tune_package(fused, [])
    assert not (tmp_path / "r").exists()


def test_the_model_card_says_what_is_fused_and_which_kinds_the_tasks_held_out(fused):
    from anomaly_localizer.tooling.release.modelcard import render_card, results_sections
    ev = {"case_set": {"kind": "synthetic", "set": "hard"}, "title": "hard", "command": "anomaly-localizer evaluate",
          "cases": 2, "lesion_voxels": 10, "abnormal_slices": 2, "normal_slices": 5, "seconds_per_case": 1.0,
          "cases_by_kind": {"source": 1, "noise": 1}, "cases_by_size": {"small (mean semi-axis < 10 mm)": 2},
          "kinds_vs_training": {"tiny-ssl": {"source": "held out (source)", "noise": "no such task"}},
          "methods": {"fused": {"pixel_ap": 0.5, "pixel_ap_by_kind": {"source": 0.4, "noise": 0.6},
                                "pixel_ap_by_size": {"small (mean semi-axis < 10 mm)": 0.5}},
                      "dae": {"pixel_ap": 0.3}}}
    card = render_card(fused, results_sections([ev], None, fused))
    assert "`dae` of tiny-dae" in card and "Rule: mean" in card and "harder synthetic set" in card
    assert "source: held out (source)" in card and "by anomaly size" in card and "| fused | 0.400 | 0.600 |" in card


def test_a_components_new_model_card_does_not_invalidate_the_fused_model_but_new_weights_do(fused, world):
    from anomaly_localizer.core.package import write_manifest
    dae = resolve_package("tiny-dae")
    card = dae.path / "README.md"
    old = card.read_text()
    try:
        card.write_text(old + "\nmore figures\n")
        write_manifest(dae.path)
        assert "fused" in score_volume(image_from(phantom_array()), load_package(fused.path), device="cpu").maps
    finally:
        card.write_text(old)
        write_manifest(dae.path)


def test_fused_slice_scores_follow_the_axial_axis_of_any_orientation(fused):
    from phantoms import psr_image
    arr = phantom_array(lesion=True)
    for image in (image_from(arr), psr_image(arr)):  # axial along numpy axis 0, and along another axis
        res = score_volume(image, fused, device="cpu")
        n_axial = image.GetSize()[res.axial_axis]
        assert res.slice_scores["fused"].shape == (n_axial,) == res.brain_voxels_per_slice.shape
        assert all(v.shape == (n_axial,) for v in res.slice_scores.values())


def test_a_component_map_asked_for_alone_comes_from_its_own_model(fused, world, monkeypatch):
    from anomaly_localizer.core.installed import resolve_package_for
    (world["models"] / "index.json").write_text(json.dumps({"default": "tiny-fused"}))
    try:
        assert resolve_package_for(None).name == "tiny-fused"
        assert resolve_package_for(["fused"]).name == "tiny-fused"
        assert resolve_package_for(["dae"]).name == "tiny-dae" and resolve_package_for(["ssl"]).name == "tiny-ssl"
        assert resolve_package_for(["dae"], "tiny-fused").name == "tiny-fused"  # asked for by name: as asked
    finally:
        (world["models"] / "index.json").unlink()


def test_a_scan_relative_fused_map_is_divided_by_its_own_median_after_the_slice_scores(fused, world, tmp_path,
                                                                                     capsys):
    out = tmp_path / "fused-rel"
    assert main(["scan-relative", str(fused.path), str(world["data"]), "--method", "fused", "--quantile", "0.5",
                 "--out", str(out), "-q"]) == 0
    rel = load_package(out)
    img = image_from(phantom_array(shape_zyx=(24, 40, 34), lesion=True))
    absolute, relative = score_volume(img, fused, ["fused"]), score_volume(img, rel, ["fused"])
    brain = absolute.brain_mask
    median = float(np.median(absolute.maps["fused"][brain]))
    assert np.allclose(relative.maps["fused"], absolute.maps["fused"] / median, rtol=1e-5)
    assert np.array_equal(relative.slice_scores["fused"], absolute.slice_scores["fused"], equal_nan=True)
    assert relative.info["scan_relative"]["fused"]["scan_value"] == pytest.approx(median)
    assert len(rel.calibration.scan_reference["fused"]) == len(rel.calibration.subjects)
    # a component's map follows its own model: naming it is refused, nothing written
    refused = tmp_path / "refused"
    assert main(["scan-relative", str(fused.path), str(world["data"]), "--method", "dae", "--quantile", "0.5",
                 "--out", str(refused), "-q"]) == 2
    assert "is a component's map, which follows its own model" in capsys.readouterr().err and not refused.exists()


def test_real_cases_for_the_choice_are_named_and_checked_before_any_scoring(tmp_path):
    import SimpleITK as sitk

    from anomaly_localizer.tooling.release.fusion import selection_cases
    for name in ("case1", "case2", "case3"):
        (tmp_path / name).mkdir()
        arr = phantom_array(lesion=True)
        sitk.WriteImage(image_from(arr), str(tmp_path / name / "image.nii.gz"))
        sitk.WriteImage(image_from((arr > arr.max() * 0.9).astype(np.uint8)), str(tmp_path / name / "label.nii.gz"))
    cases = selection_cases(str(tmp_path), ["case1", "case3"], "image.nii.gz", "label.nii.gz", None)
    assert [c.id for c in cases] == ["case1", "case3"]  # case2 stays held out
    with pytest.raises(InputError, match="no such case folder"):
        selection_cases(str(tmp_path), ["case9"], "image.nii.gz", "label.nii.gz", None)
    assert main(["fuse", "tiny-dae:dae", "--out", str(tmp_path / "f"), "--select-ids", "case1"]) == 2


def test_weights_given_by_hand_make_a_weighted_mean(world, tmp_path):
    assert main(["fuse", "tiny-dae:dae", "tiny-ssl:ssl", "--rule", "weighted", "--weights", "1,2",
                 "--out", str(tmp_path / "w"), "-q"]) == 0
    arch = load_package(tmp_path / "w").architecture
    assert arch["rule"] == "weighted" and [c["weight"] for c in arch["components"]] == [1.0, 2.0]
    for bad in (["--weights", "1"], ["--weights", "1,-2"], []):  # wrong count, not positive, none
        assert main(["fuse", "tiny-dae:dae", "tiny-ssl:ssl", "--rule", "weighted", *bad,
                     "--out", str(tmp_path / "x"), "-q"]) == 2
    assert main(["fuse", "tiny-dae:dae", "tiny-ssl:ssl", "--weights", "1,2", "--rule", "mean",
                 "--out", str(tmp_path / "y"), "-q"]) == 2
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_a_fused_model_is_rebuilt_like_itself_on_a_changed_component(fused, world, tmp_path, monkeypatch):
    import shutil
    from anomaly_localizer.core.fusion import content_sha256
    from anomaly_localizer.core.package import update_meta
    changed = tmp_path / "models"
    shutil.copytree(world["models"] / "tiny-dae", changed / "tiny-dae")
    meta = dict(load_package(changed / "tiny-dae").meta)
    meta["scan_relative"] = {"dae": {"quantile": 0.5}}
    update_meta(changed / "tiny-dae", meta)
    dae = calibrate_package(load_package(changed / "tiny-dae"), find_subjects(world["data"])[2:4])
    like = tmp_path / "old-fused"  # the fused model as a user has it, with its own texts
    shutil.copytree(fused.path, like)
    update_meta(like, {**fused.meta, "description": "what this map is, in the user's words",
                       "limitations": ["one of its limits"]})
    fused = load_package(like)
    monkeypatch.setenv("ANOMALY_LOCALIZER_MODELS", os.pathsep.join([str(changed), str(world["models"])]))
    with pytest.raises(PackageError, match="fuse --like tiny-fused"):
        score_volume(image_from(phantom_array()), fused, device="cpu")
    # --like takes everything from the fused model it names: nothing else may be given
    assert main(["fuse", "--like", str(fused.path), "tiny-dae:dae", "--out", str(tmp_path / "x"), "-q"]) == 2
    assert main(["fuse", "--like", str(fused.path), "--out", str(tmp_path / "x"), "-q"]) == 2  # no --data
    assert main(["fuse", "--like", str(fused.path), "--out", str(tmp_path / "x"), "--data", str(world["data"]),
                 "--per-subject", "5", "-q"]) == 2  # it chooses nothing
    assert not (tmp_path / "x").exists()
    assert main(["fuse", "--like", str(fused.path), "--out", str(tmp_path / "tiny-fused"),
                 "--data", str(world["data"]), "-q"]) == 0
    new = load_package(tmp_path / "tiny-fused")
    assert new.architecture["rule"] == fused.architecture["rule"]
    assert new.meta["description"] == "what this map is, in the user's words"
    assert new.meta["limitations"] == ["one of its limits"]
    pins = {c["model"]: c["content_sha256"] for c in new.architecture["components"]}
    assert pins["tiny-dae"] == content_sha256(dae.files) != \
        {c["model"]: c["content_sha256"] for c in fused.architecture["components"]}["tiny-dae"]
    assert new.calibration.pixel["fused"] != fused.calibration.pixel["fused"]  # recalibrated on the new maps
    assert new.meta["training"]["rebuilt_from"]["model"] == fused.name
    res = score_volume(image_from(phantom_array(lesion=True)), new, device="cpu")
    assert res.info["scan_relative"]["dae"]["quantile"] == 0.5 and np.isfinite(res.maps["fused"]).all()
