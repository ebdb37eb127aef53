"""Geometry and preprocessing: the axial axis comes from the direction matrix, outputs land on
the input's exact grid, intensities are normalised per volume without clipping."""

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from anomaly_localizer.errors import InputError
from anomaly_localizer.core.pipeline import score_volume
from anomaly_localizer.core.volume import axial_layout, brain_mask, normalise_intensities, prepare_volume

from phantoms import TINY_CONTRACT, image_from, phantom_array, psr_image, rotation


def test_axial_axis_comes_from_the_direction_matrix_not_array_order():
    psr = psr_image(phantom_array())
    layout = axial_layout(psr)
    assert layout.axial_axis == 1  # index axis j points superior
    assert layout.shape == (30, 48, 40)
    assert axial_layout(image_from(phantom_array())).axial_axis == 2


def test_canonical_round_trip_is_exact_for_every_axis_order_and_flip():
    rng = np.random.default_rng(0)
    arr = rng.random((5, 6, 7)).astype(np.float32)
    for direction in [(1, 0, 0, 0, 1, 0, 0, 0, 1), (0, 0, -1, 1, 0, 0, 0, 1, 0), (-1, 0, 0, 0, 0, 1, 0, -1, 0),
                      rotation(0.3, -0.2, 0.5)]:
        img = image_from(arr, direction=direction)
        layout = axial_layout(img)
        np.testing.assert_array_equal(layout.from_canonical(layout.to_canonical(arr)), arr)


def test_psr_stored_phantom_scores_like_the_axial_one():
    """Same anatomy, different voxel order: the heatmaps must be the same anatomy-wise."""
    from phantoms import make_tiny_package
    import tempfile
    from pathlib import Path
    pkg = make_tiny_package(Path(tempfile.mkdtemp()) / "tiny", seed=3)
    arr = phantom_array(lesion=True)
    axial = score_volume(image_from(arr, direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)), pkg, ["rec", "kl_grad"])
    psr_img = psr_image(arr)
    psr = score_volume(psr_img, pkg, ["rec", "kl_grad"])
    for m in ("rec", "kl_grad"):
        back = axial_layout(psr_img).to_canonical(psr.maps[m])  # (S, P, L)
        np.testing.assert_allclose(back, axial.maps[m], rtol=1e-4, atol=1e-6)
    # slice scores follow the input's own axial axis (here index j)
    np.testing.assert_allclose(psr.slice_scores["elbo"], axial.slice_scores["elbo"], rtol=1e-5, equal_nan=True)


@pytest.mark.parametrize("direction,spacing", [
    ((1, 0, 0, 0, 1, 0, 0, 0, 1), (4.0, 4.0, 4.0)),
    (rotation(0.25, 0.1, -0.3), (4.0, 4.0, 4.0)),  # oblique
    ((1, 0, 0, 0, 1, 0, 0, 0, 1), (3.0, 3.5, 6.0)),  # anisotropic
    ((0, 0, -1, 1, 0, 0, 0, 1, 0), (2.5, 4.0, 5.0)),  # P,S,R and anisotropic
])
def test_outputs_are_on_the_inputs_exact_grid(tiny_package, direction, spacing, tmp_path):
    arr = phantom_array(lesion=True)
    img = image_from(arr, spacing=spacing, direction=direction, origin=(-31.5, 12.25, 40.0))
    res = score_volume(img, tiny_package, ["combi"])
    from anomaly_localizer.core.volume import image_like
    out = image_like(res.maps["combi"], img)
    sitk.WriteImage(out, str(tmp_path / "m.nii.gz"))
    back = sitk.ReadImage(str(tmp_path / "m.nii.gz"))
    assert back.GetSize() == img.GetSize()
    np.testing.assert_allclose(back.GetSpacing(), img.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(back.GetOrigin(), img.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(back.GetDirection(), img.GetDirection(), atol=1e-5)
    assert (res.maps["combi"][arr == 0] == 0).all()


def test_anisotropic_in_plane_spacing_keeps_the_brain_proportions():
    arr = phantom_array()
    img = image_from(arr, spacing=(4.0, 2.0, 4.0))  # x 4 mm, y 2 mm: brain half as long in y
    prep = prepare_volume(img, arr != 0, TINY_CONTRACT)
    m = prep.mask[:, 0].any(0).numpy()
    rows, cols = np.nonzero(m.any(1))[0], np.nonzero(m.any(0))[0]
    # 48 rows * 2 mm * 0.85 vs 40 cols * 4 mm * 0.8: AP extent / LR extent ~ 0.64
    assert (rows[-1] - rows[0]) / (cols[-1] - cols[0]) == pytest.approx(0.64, abs=0.12)


def test_normalisation_is_per_volume_and_keeps_lesions_unclipped():
    arr = phantom_array(lesion=True)
    mask = arr != 0
    norm = normalise_intensities(arr, mask)
    assert norm[~mask].max() == 0 and norm[~mask].min() == 0
    assert np.median(norm[mask]) == pytest.approx(0.5, abs=1e-5)
    q1, q3 = np.percentile(norm[mask], [25, 75])
    assert q3 - q1 == pytest.approx(0.25, abs=1e-5)
    lesion_value = norm[mask].max()
    assert lesion_value > 1.2  # the bright lesion stays far above white matter (about 0.7)
    # A lesion twice as bright stays twice as far from the median: nothing is clipped.
    brighter = normalise_intensities(np.where(arr == 1600, 3200, arr), mask)
    med = np.median(arr[mask])
    assert (brighter.max() - 0.5) / (lesion_value - 0.5) == pytest.approx((3200 - med) / (1600 - med), rel=1e-4)
    # Invariant to a global intensity scale and offset inside the brain
    np.testing.assert_allclose(normalise_intensities(np.where(mask, 3 * arr + 50, 0), mask), norm, atol=1e-5)


def test_model_space_to_input_grid_keeps_a_constant_map_constant():
    arr = phantom_array()
    img = image_from(arr, spacing=(3.0, 3.5, 4.0))
    prep = prepare_volume(img, arr != 0, TINY_CONTRACT)
    import torch
    back = prep.to_input_grid(torch.ones(prep.slices.shape[0], 32, 32))
    assert np.allclose(back[arr != 0], 1.0) and (back[arr == 0] == 0).all()


def test_mask_on_another_grid_is_refused():
    img = image_from(phantom_array())
    other = image_from((phantom_array() != 0).astype(np.uint8), spacing=(4.0, 4.0, 4.5))
    with pytest.raises(InputError, match="another grid"):
        brain_mask(img, other)


def test_empty_mask_and_all_zero_image_are_refused():
    img = image_from(phantom_array())
    with pytest.raises(InputError, match="empty"):
        brain_mask(img, image_from(np.zeros(phantom_array().shape, np.uint8)))
    with pytest.raises(InputError, match="all zero"):
        brain_mask(image_from(np.zeros((10, 10, 10), np.float32)), None)


def test_whole_head_without_mask_is_refused_with_advice():
    rng = np.random.default_rng(0)
    head = (rng.random((90, 120, 120)) * 100 + 1).astype(np.float32)  # no zero background, 2 mm: 10 L
    with pytest.raises(InputError, match="skull-stripped.*--mask"):
        brain_mask(image_from(head, spacing=(2.0, 2.0, 2.0)), None)


def test_uniform_brain_is_refused():
    arr = (phantom_array() != 0).astype(np.float32) * 5
    with pytest.raises(InputError, match="uniform"):
        normalise_intensities(arr, arr != 0)


def test_a_z_scored_skull_stripped_scan_is_recognised_by_its_constant_background():
    """BraTS-style preprocessing z-scores a skull-stripped brain, so the background is a
    non-zero constant (-mean/std): it is still skull-stripped, not a whole head."""
    from anomaly_localizer.core.volume import background_value, brain_mask
    arr = phantom_array()
    brain = arr != 0
    z = np.where(brain, (arr - arr[brain].mean()) / arr[brain].std(), -arr[brain].mean() / arr[brain].std())
    z = z.astype(np.float32)
    assert background_value(z) == pytest.approx(float(z[0, 0, 0]))
    np.testing.assert_array_equal(brain_mask(image_from(z), None), brain)
    assert background_value(arr) == 0.0


def _thin_sliced(lesion=False):
    """The phantom with slices 1.5 mm apart (60 of them) for a 6 mm model: four times thinner."""
    return image_from(phantom_array((96, 48, 40), lesion=lesion), spacing=(4.0, 4.0, 1.5))


def test_thin_slices_are_scored_at_the_models_own_slice_spacing():
    img = _thin_sliced()
    mask = brain_mask(img, None)
    native = prepare_volume(img, mask, TINY_CONTRACT)
    grid = prepare_volume(img, mask, TINY_CONTRACT, model_slices=True)
    assert native.grid_positions is None and len(native.slice_index) == 76  # every brain slice
    steps = np.diff(grid.grid_positions)
    np.testing.assert_allclose(steps, 4.0)  # 6 mm apart in 1.5 mm input slices
    assert 18 <= len(grid.slice_index) <= 20 and grid.with_context(3).shape[0] == len(grid.slice_index)
    # A map that is 1 in the model's brain comes back as 1 on every input brain voxel,
    # between the model's slices too; slice values are interpolated onto every brain slice.
    back = grid.to_input_grid(torch.ones(len(grid.slice_index), 32, 32))
    assert back[mask].min() > 0.99 and back[~mask].max() == 0
    per_slice = grid.to_input_slices(torch.as_tensor(grid.slice_index, dtype=torch.float64))
    has_brain = grid.to_input_slices(canonical=grid.brain_voxels) > 0
    assert np.isfinite(per_slice[has_brain]).all() and np.isnan(per_slice[~has_brain]).all()
    assert np.all(np.diff(per_slice[has_brain]) >= 0)  # the grid's order, interpolated
    # The model slices are the input resampled through the plane: mapped back they match it.
    again = grid.to_input_grid(grid.slices[:, 0])
    truth = native.to_input_grid(native.slices[:, 0])
    inner = mask & (np.abs(truth) < 5)
    assert np.corrcoef(again[inner], truth[inner])[0, 1] > 0.9


def test_a_thin_sliced_scan_scores_fewer_slices_with_maps_on_its_own_grid(tiny_package):
    img = _thin_sliced(lesion=True)
    res = score_volume(img, tiny_package, ["rec"])
    assert res.info["scored_slices"] < 25 and res.maps["rec"].shape == (96, 48, 40)
    assert np.isfinite(res.slice_scores["elbo"][res.brain_voxels_per_slice > 0]).all()


def test_work_on_the_bounding_box_gives_the_whole_grid_result():
    """Brain extraction's clean-up and the contrast's depth shells run on the region's box:
    the same masks and figures as on the whole grid, the region touching an edge or not."""
    import SimpleITK as sitk
    from anomaly_localizer.core.brainextract import postprocess
    from anomaly_localizer.core.contrast import image_features
    from anomaly_localizer.core.regions import bounding_box

    rng = np.random.default_rng(3)
    zz, yy, xx = np.mgrid[:40, :48, :44]
    ball = (zz - 20) ** 2 + (yy - 24) ** 2 + (xx - 22) ** 2 < 15 ** 2
    hole = (zz - 20) ** 2 + (yy - 24) ** 2 + (xx - 22) ** 2 < 4 ** 2
    speck = (zz == 2) & (yy == 3) & (xx == 3)
    cut = (zz - 20) ** 2 + (yy - 24) ** 2 + (xx - 3) ** 2 < 15 ** 2  # cut by the grid's edge
    for region in (ball & ~hole | speck, cut & ~hole):
        prob = region.astype(np.float32)
        binary = sitk.GetImageFromArray(region.astype(np.uint8))
        cc = sitk.RelabelComponent(sitk.ConnectedComponent(binary), sortByObjectSize=True)
        whole = sitk.GetArrayFromImage(sitk.BinaryFillhole(sitk.BinaryThreshold(cc, 1, 1, 1, 0))) > 0
        assert np.array_equal(postprocess(prob), whole)
        arr = rng.normal(100, 10, region.shape).astype(np.float32) + 20 * (xx > 22)
        mask = postprocess(prob)
        depth = sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(
            sitk.GetImageFromArray(mask.astype(np.uint8)), insideIsPositive=True, squaredDistance=False,
            useImageSpacing=True))[mask]
        v = arr[mask].astype(np.float64)
        q25, med, q75 = np.percentile(v, [25, 50, 75])
        shells = [(np.median(v[(depth >= lo) & (depth < hi)]) - med) / (q75 - q25) for lo, hi in ((0, 2), (4, 6))]
        assert image_features(arr, mask)["surface"] == shells[0]  # the deep shell needs a bigger brain
    assert bounding_box(np.zeros((3, 3), bool)) is None
    assert bounding_box(ball, margin=1)[0] == slice(5, 36)
