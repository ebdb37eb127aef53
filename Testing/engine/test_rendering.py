"""Healthy brains in other contrasts, rendered from a parcellation, and the intensity rule."""

import json

import numpy as np
import pytest
import SimpleITK as sitk

from phantoms import CSF, GREY, VENT, WHITE, parcellated_folder, parcellation, t1_of

from anomaly_localizer.cli import main
from anomaly_localizer.core.package import load_package
from anomaly_localizer.core.pipeline import score_volume
from anomaly_localizer.tooling.data import find_subjects, split_subjects
from anomaly_localizer.tooling.rendering import render, render_folder, rendered_contrast, source_subject

def medians(arr, labels):
    return {name: float(np.median(arr[np.isin(labels, ids)]))
            for name, ids in (("csf", [VENT]), ("grey", [GREY]), ("white", [WHITE]))}


@pytest.mark.parametrize("contrast, order", [
    ("t1", ("csf", "grey", "white")), ("t1c", ("csf", "grey", "white")),
    ("t2", ("white", "grey", "csf")), ("flair", ("csf", "white", "grey"))])
def test_each_contrast_is_rendered_in_its_tissue_order(contrast, order):
    labels = parcellation()
    arr, drawn = render(t1_of(labels), labels, contrast, np.random.default_rng(1))
    m = medians(arr, labels)
    assert m[order[0]] < m[order[1]] < m[order[2]], m
    assert drawn.contrast == contrast and (arr[labels == 0] == 0).all() and np.isfinite(arr).all()


def test_a_rendering_keeps_the_t1_texture_and_depends_only_on_its_seed():
    labels = parcellation()
    t1 = t1_of(labels, texture=80.0)
    a, _ = render(t1, labels, "t2", np.random.default_rng(5))
    b, _ = render(t1, labels, "t2", np.random.default_rng(5))
    assert np.array_equal(a, b)
    white = labels == WHITE
    # T2 reverses T1 within a tissue too: brighter T1 voxels of white matter render darker
    assert np.corrcoef(t1[white], a[white])[0, 1] < -0.3


def test_a_folder_of_renderings_is_split_by_subject_like_its_t1_folder(tmp_path):
    data = tmp_path / "ixi"
    ids = parcellated_folder(data, n=8)
    assert main(["render", str(data), "--contrast", "flair:2", "--contrast", "t2", "--out", str(tmp_path / "r"),
                 "-q"]) == 0
    record = json.loads((tmp_path / "r" / "rendering.json").read_text())
    assert len(record["renderings"]) == 8 * 3 and record["contrasts"] == {"flair": 2, "t2": 1}
    subjects = find_subjects(tmp_path / "r")
    assert {rendered_contrast(s.id) for s in subjects} == {"flair", "t2"}
    assert all(s.others and s.others[0][0] == "t1" for s in subjects)  # each with the T1 it came from
    split = split_subjects([s.id for s in subjects], 0, 0.1, 0.15, 0.15)
    t1_split = split_subjects(ids, 0, 0.1, 0.15, 0.15)
    for part, members in split.items():
        assert {source_subject(i) for i in members} == set(t1_split[part])
    # nothing is overwritten, an unknown contrast is refused
    assert main(["render", str(data), "--contrast", "flair", "--out", str(tmp_path / "r"), "-q"]) == 2
    assert main(["render", str(data), "--contrast", "dwi", "--out", str(tmp_path / "r2"), "-q"]) == 2


def test_the_rule_model_flags_bright_voxels_and_reads_its_contrast_only(tmp_path):
    labels = parcellation()
    healthy = [t1_of(labels, i) for i in range(4)]
    folder = tmp_path / "flairs"
    folder.mkdir()
    for i, arr in enumerate(healthy):  # "FLAIR" scans: the grey matter brighter than white
        flair = np.where(labels == GREY, arr * 1.9, arr)
        img = sitk.GetImageFromArray(flair.astype(np.float32))
        img.SetSpacing((4.0, 4.0, 4.0))
        sitk.WriteImage(img, str(folder / f"F{i}~flair~0.nii.gz"))
        m = sitk.GetImageFromArray((labels > 0).astype(np.uint8))
        m.SetSpacing((4.0, 4.0, 4.0))
        sitk.WriteImage(m, str(folder / f"F{i}~flair~0_brainmask.nii.gz"))
    assert main(["make-rule", str(folder), "--contrast", "flair", "--out", str(tmp_path / "rule"), "-q"]) == 0
    pkg = load_package(tmp_path / "rule")
    assert pkg.contract.contrasts == ["flair"] and pkg.methods == ("rule",) and pkg.calibration.pixel["rule"]
    assert not (tmp_path / "rule" / "model.safetensors").exists()  # no weights
    lesioned = np.where(labels == GREY, healthy[0] * 1.9, healthy[0])
    z, y, x = np.meshgrid(*[np.arange(n) for n in labels.shape], indexing="ij")
    lesion = ((z - 20) ** 2 + (y - 24) ** 2 + (x - 30) ** 2) < 16
    lesioned[lesion & (labels == WHITE)] = 3000
    img = sitk.GetImageFromArray(lesioned.astype(np.float32))
    img.SetSpacing((4.0, 4.0, 4.0))
    res = score_volume(img, pkg, ["rule"], mask=sitk.Cast(img > 0, sitk.sitkUInt8))
    rule = res.maps["rule"]
    assert rule[lesion & (labels == WHITE)].mean() > 3 * rule[(labels == WHITE) & ~lesion].mean()
    assert (rule[~res.brain_mask] == 0).all() and (rule >= 0).all()
