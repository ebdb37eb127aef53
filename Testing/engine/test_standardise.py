"""Histogram standardisation: a scan's brain landmarks land on the training scans' standard,
nothing is clipped, and a standardised package stores its standard and is recalibrated."""

import numpy as np
from phantoms import healthy_folder, image_from, make_tiny_dae_package, phantom_array

from anomaly_localizer.core.package import load_package
from anomaly_localizer.core.pipeline import score_volume
from anomaly_localizer.core.schema import Normalisation
from anomaly_localizer.core.volume import normalise_intensities, standardise
from anomaly_localizer.tooling.data import find_subjects
from anomaly_localizer.tooling.release.standardise import LANDMARK_PERCENTILES, standardise_package


def test_landmarks_land_on_the_standard_and_the_ends_go_on_linearly():
    rng = np.random.default_rng(0)
    values = rng.gamma(3.0, 0.2, 20000)
    marks = np.percentile(values, LANDMARK_PERCENTILES)
    standard = np.linspace(0.1, 0.9, len(marks))
    out = standardise(values, marks, standard)
    np.testing.assert_allclose(np.percentile(out, LANDMARK_PERCENTILES), standard, atol=2e-3)
    assert np.all(np.diff(out[np.argsort(values)]) >= -1e-6)  # monotone: the order of intensities stays
    bright = standardise(np.array([marks[-1] + 1.0, marks[-1] + 2.0]), marks, standard)
    assert bright[1] - bright[0] > 0 and bright[0] > standard[-1]  # a bright lesion keeps its contrast


def test_a_scan_with_another_contrast_curve_is_brought_onto_the_standard():
    arr = phantom_array(seed=1)
    mask = arr != 0
    reference = normalise_intensities(arr, mask)
    marks = np.percentile(reference[mask], LANDMARK_PERCENTILES)
    norm = Normalisation(standard={"percentiles": list(LANDMARK_PERCENTILES), "values": list(marks)})
    other = np.where(mask, (arr / arr.max()) ** 1.8 * 1000, 0)  # another scanner's contrast curve
    plain, standardised = normalise_intensities(other, mask), normalise_intensities(other, mask, norm)
    err_plain = np.abs(np.percentile(plain[mask], LANDMARK_PERCENTILES) - marks).max()
    err_std = np.abs(np.percentile(standardised[mask], LANDMARK_PERCENTILES) - marks).max()
    assert err_std < 0.01 < err_plain


def test_a_standardised_package_records_its_standard_and_is_recalibrated(tmp_path):
    subjects = find_subjects(healthy_folder(tmp_path / "healthy", n=4))
    package = make_tiny_dae_package(tmp_path / "tiny-dae")
    done = standardise_package(package, subjects[:2], subjects[2:])
    again = load_package(done.path)  # hashes checked
    standard = again.contract.normalisation.standard
    assert standard is not None and list(standard.percentiles) == list(LANDMARK_PERCENTILES)
    assert again.calibration.subjects == [s.id for s in subjects[2:]]
    res = score_volume(image_from(phantom_array(lesion=True)), again, ["dae"])
    assert np.isfinite(res.maps["dae"]).all()
