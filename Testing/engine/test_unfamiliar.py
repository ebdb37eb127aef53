"""``unfamiliar-scans``: healthy scans from other sources, laid out for ``fpr``."""

import SimpleITK as sitk
from phantoms import image_from, phantom_array

from anomaly_localizer.cli import main
from anomaly_localizer.tooling.data import find_subjects


def test_unfamiliar_scans_are_written_as_fpr_folders(tmp_path, capsys):
    colin = tmp_path / "ch2bet.nii.gz"
    sitk.WriteImage(image_from(phantom_array()), str(colin))
    assert main(["unfamiliar-scans", str(tmp_path / "out"), "--colin27", str(colin)]) == 0
    for name in ("colin27", "mni152"):
        subjects = find_subjects(tmp_path / "out" / name)
        assert [s.id for s in subjects] == [name] and subjects[0].mask is not None
    brain = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "colin27" / "colin27_brainmask.nii.gz")))
    assert ((brain > 0) == (phantom_array() > 0)).mean() > 0.99  # the skull-stripped scan's brain
    assert "fpr MODEL" in capsys.readouterr().out


def test_a_missing_colin27_is_said_with_how_to_get_it(tmp_path, capsys):
    assert main(["unfamiliar-scans", str(tmp_path / "out"), "--colin27", str(tmp_path / "none.nii.gz")]) == 2
    err = capsys.readouterr().err
    assert "mricron-data" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
