"""Reading what the files really hold, and refusing what cannot be scored."""


import numpy as np
import pytest
import SimpleITK as sitk

from anomaly_localizer.errors import InputError
from anomaly_localizer.core.imageio import nifti_data_is_finite, read_image

from phantoms import image_from, phantom_array, write_dicom_series


@pytest.mark.parametrize("ext", ["nii.gz", "nii", "nrrd", "mha"])
def test_nan_and_inf_are_found_in_every_format(tmp_path, ext):
    arr = phantom_array()
    arr[10, 20, 20] = np.nan
    path = tmp_path / f"x.{ext}"
    sitk.WriteImage(image_from(arr), str(path))
    with pytest.raises(InputError, match="NaN or infinite"):
        read_image(path)
    arr[10, 20, 20] = 0
    arr[3, 3, 3] = np.inf
    sitk.WriteImage(image_from(arr), str(path))
    with pytest.raises(InputError, match="NaN or infinite"):
        read_image(path)


def test_simpleitk_hides_nifti_nan_which_is_why_raw_data_are_checked(tmp_path):
    arr = phantom_array()
    arr[1, 1, 1] = np.nan
    path = tmp_path / "x.nii.gz"
    sitk.WriteImage(image_from(arr), str(path))
    assert np.isfinite(sitk.GetArrayFromImage(sitk.ReadImage(str(path)))).all()
    assert not nifti_data_is_finite(path)


def test_finite_float_and_integer_nifti_pass(tmp_path):
    sitk.WriteImage(image_from(phantom_array()), str(tmp_path / "f.nii.gz"))
    sitk.WriteImage(image_from(phantom_array().astype(np.int16)), str(tmp_path / "i.nii"))
    assert read_image(tmp_path / "f.nii.gz").GetSize() == (40, 48, 30)
    assert read_image(tmp_path / "i.nii").GetSize() == (40, 48, 30)


def test_2d_4d_and_vector_images_are_refused(tmp_path):
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((20, 20), np.float32)), str(tmp_path / "2d.nrrd"))
    with pytest.raises(InputError, match="2D"):
        read_image(tmp_path / "2d.nrrd")
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((3, 10, 10, 10), np.float32), isVector=False),
                    str(tmp_path / "4d.nii.gz"))
    with pytest.raises(InputError, match="4D"):
        read_image(tmp_path / "4d.nii.gz")
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((10, 10, 10, 3), np.uint8), isVector=True),
                    str(tmp_path / "rgb.nrrd"))
    with pytest.raises(InputError, match="components"):
        read_image(tmp_path / "rgb.nrrd")


def test_single_slice_volume_is_refused(tmp_path):
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((1, 20, 20), np.float32)), str(tmp_path / "s.nrrd"))
    with pytest.raises(InputError, match="single slice|2D"):
        read_image(tmp_path / "s.nrrd")


def test_corrupt_truncated_and_missing_files_are_refused(tmp_path):
    (tmp_path / "junk.nii.gz").write_bytes(b"this is not an image")
    with pytest.raises(InputError, match="cannot read"):
        read_image(tmp_path / "junk.nii.gz")
    sitk.WriteImage(image_from(phantom_array()), str(tmp_path / "t.nii"))
    raw = (tmp_path / "t.nii").read_bytes()
    (tmp_path / "t.nii").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(InputError, match="cannot read"):
        read_image(tmp_path / "t.nii")
    with pytest.raises(InputError, match="does not exist"):
        read_image(tmp_path / "nope.nii.gz")


def test_dicom_series_folder_is_read(tmp_path):
    arr = phantom_array().astype(np.int16)
    folder = write_dicom_series(arr, tmp_path / "dicom")
    img = read_image(folder)
    assert img.GetSize() == (40, 48, 30)
    np.testing.assert_allclose(img.GetSpacing(), (4.0, 4.0, 4.0), atol=1e-3)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), arr)


def test_empty_folder_is_refused(tmp_path):
    with pytest.raises(InputError, match="no DICOM series"):
        read_image(tmp_path)
