"""The anatomy-conditioned score: each voxel against its own tissue class in the scan, and
the contrast-agnostic tissue segmenter it uses (trained on parcellated T1s and renderings)."""

import numpy as np
import SimpleITK as sitk
import torch
from phantoms import CSF, GREY, VENT, WHITE, parcellated_folder, parcellation, t1_of

from anomaly_localizer.cli import main
from anomaly_localizer.core.detectors.anatomy import TISSUE_CLASSES, class_references, tissue_deviation
from anomaly_localizer.core.package import load_package
from anomaly_localizer.core.pipeline import score_volume
from anomaly_localizer.tooling.training.train_tissue import (
    TissueTrainConfig,
    augment,
    paste_blobs,
    random_lookup,
    segmentation_loss,
    tissue_classes,
)


def two_tissues(seed=0):
    """(x, probs, brain) of 4 slices: white matter (0.5) on the left, grey (0.9) on the right."""
    rng = np.random.default_rng(seed)
    x = torch.full((4, 32, 32), 0.5) + torch.from_numpy(rng.normal(0, 0.02, (4, 32, 32))).float()
    x[:, :, 16:] += 0.4
    probs = torch.zeros(4, 5, 32, 32)
    probs[:, 2, :, :16] = 1  # white
    probs[:, 1, :, 16:] = 1  # cortical grey
    return x, probs, torch.ones(4, 32, 32, dtype=torch.bool)


def test_a_bright_spot_in_white_matter_stands_out_and_bright_cortex_does_not():
    x, probs, brain = two_tissues()
    x[1, 10:13, 4:7] = 0.8  # brighter than white matter, darker than grey
    score = tissue_deviation(x, probs, brain, "bright")
    spot, cortex = score[1, 10:13, 4:7], score[:, :, 16:]
    assert spot.min() > 5 and cortex.quantile(0.99) < 2.5
    rule = ((x - x[brain].median()) / 0.25).clamp_min(0)  # the whole-brain rule flags the cortex instead
    assert rule[:, :, 16:].mean() > rule[1, 10:13, 4:7].mean()


def test_a_voxel_between_two_tissues_fits_either_and_direction_is_kept():
    x, probs, brain = two_tissues()
    probs[:, :, :, 15:17] = 0  # partial volume at the border: half white, half grey, grey-like intensity
    probs[:, 2, :, 15:17], probs[:, 1, :, 15:17] = 0.5, 0.5
    x[:, :, 15:17] = 0.9
    assert tissue_deviation(x, probs, brain, "bright")[:, :, 15:17].max() < 2.5
    x[2, 20:23, 4:7] = 0.1  # darker than white matter: only "dark" and "both" see it
    assert tissue_deviation(x, probs, brain, "bright")[2, 20:23, 4:7].max() == 0
    assert tissue_deviation(x, probs, brain, "dark")[2, 20:23, 4:7].min() > 5
    assert tissue_deviation(x, probs, brain, "both")[2, 20:23, 4:7].min() > 5


def test_a_large_lesion_barely_moves_its_own_tissue_reference():
    x, probs, brain = two_tissues()
    clean = class_references(x, probs, brain)[2]
    x[:, 4:12, 2:10] = 1.4  # a lesion of 12 % of the white matter, labelled white matter
    lesioned = class_references(x, probs, brain)[2]
    assert abs(lesioned[0] - clean[0]) < 0.02 and lesioned[1] < 2 * clean[1]
    assert tissue_deviation(x, probs, brain, "bright")[:, 4:12, 2:10].min() > 5
    assert class_references(x, probs, brain)[0] is None  # no CSF in this scan: no reference of its own


def test_dlmuse_regions_become_the_tissue_classes():
    labels = parcellation()
    classes = tissue_classes(labels, (4.0, 4.0, 4.0))
    assert (classes[labels == 0] == 0).all() and (classes[np.isin(labels, [CSF, VENT])] == 1).all()
    assert (classes[labels == GREY] == 2).all()
    white = classes[labels == WHITE]
    assert set(np.unique(white)) == {3, 5}  # white matter, and the white matter next to the ventricles
    assert (white == 3).sum() > (white == 5).sum() > 0
    assert len(TISSUE_CLASSES) == 5


def test_the_training_randomisation_keeps_labels_and_the_brain():
    cfg = TissueTrainConfig()
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(6, 1, 32, 32) * 0.5 + 0.25
    y = torch.randint(0, 5, (6, 32, 32))
    y[:, :4] = -1  # outside the brain
    x[:, :, :4] = 0
    brain = (y >= 0)[:, None]
    looked_up = random_lookup(x, brain, gen)
    assert torch.allclose(looked_up[brain].median(), torch.tensor(0.5), atol=0.05)
    assert not torch.allclose(looked_up, x)
    pasted = paste_blobs(x, brain, gen)
    assert (pasted[~brain] == 0).all() and not torch.equal(pasted, x)
    ax, ay = augment(x.clone(), y.clone(), cfg, gen)
    assert ((ay >= 0) == (ax[:, 0] != 0)).float().mean() > 0.99  # labels follow the flips, outside stays 0
    logits = torch.randn(6, 5, 32, 32, requires_grad=True)
    loss = segmentation_loss(logits, y)
    loss.backward()
    assert torch.isfinite(loss) and logits.grad[:, :, :4].abs().sum() == 0  # nothing learned outside the brain


def test_train_tissue_writes_a_package_whose_map_knows_anatomy(tmp_path):
    data = tmp_path / "ixi"
    parcellated_folder(data, n=8, shape=(24, 30, 28))
    assert main(["render", str(data), "--contrast", "t2", "--out", str(tmp_path / "r"), "-q"]) == 0
    cfg = tmp_path / "cfg.json"
    cfg.write_text('{"architecture": {"slice_size": 32, "feature_maps": [4, 8]}, "spacing_mm": 4.0, '
                   '"validate_every": 2, "batch_size": 4}')
    assert main(["train-tissue", str(data), "--renders", str(tmp_path / "r"), "--out", str(tmp_path / "tissue"),
                 "--config", str(cfg), "--steps", "4", "--cache", str(tmp_path / "cache"), "-q"]) == 0
    pkg = load_package(tmp_path / "tissue")
    assert pkg.methods == ("anatomy",) and pkg.arch_type == "tissue-unet"
    assert pkg.contract.contrasts == ["t1"]  # released per contrast
    history = pkg.meta["training"]["history"]
    assert len(history) == 2 and all("dice_white" in h for h in history)
    labels = parcellation((24, 30, 28))
    img = sitk.GetImageFromArray(t1_of(labels, 9))
    img.SetSpacing((4.0, 4.0, 4.0))
    mask = sitk.GetImageFromArray((labels > 0).astype(np.uint8))
    mask.CopyInformation(img)
    res = score_volume(img, pkg, ["anatomy"], mask=mask)
    m = res.maps["anatomy"]
    assert np.isfinite(m).all() and (m[~res.brain_mask] == 0).all() and (m >= 0).all()
    # released to read T2, its tissue classes from the study's T1 where given; calibrated on T2 renderings
    assert main(["release", str(tmp_path / "tissue"), "--out", str(tmp_path / "t2-anatomy"), "--data",
                 str(tmp_path / "r"), "--contrast", "t2", "--contrast", "t1", "-q"]) == 0
    released = load_package(tmp_path / "t2-anatomy")
    assert released.contract.contrasts == ["t2", "t1"] and released.contract.optional_contrasts == []
    assert released.calibration.pixel["anatomy"].n_subjects >= 1 and "anatomy" in released.calibration.findings
    # a contrast twice is refused, and so are several for a model that reads one
    assert main(["release", str(tmp_path / "tissue"), "--out", str(tmp_path / "x"), "--data", str(tmp_path / "r"),
                 "--contrast", "t2", "--contrast", "t2", "-q"]) == 2
    from phantoms import make_tiny_dae_package
    dae = make_tiny_dae_package(tmp_path / "dae")
    assert main(["release", str(dae.path), "--out", str(tmp_path / "y"), "--data", str(tmp_path / "r"),
                 "--contrast", "t2", "--contrast", "t1", "-q"]) == 2
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    # an existing package is not overwritten
    assert main(["train-tissue", str(data), "--out", str(tmp_path / "tissue"), "--config", str(cfg),
                 "--steps", "2", "-q"]) == 2


def test_a_model_reading_flair_and_t1_takes_the_tissue_classes_from_the_t1(tmp_path):
    from anomaly_localizer.core.package import build_network, save_package
    arch = {"type": "tissue-unet", "slice_size": 32, "feature_maps": [4, 8]}
    contract = {"contrasts": ["flair", "t1"], "optional_contrasts": ["t1"], "orientation": "axial",
                "slice_size": 32, "spacing_mm": 4.0, "context_slices": 1}
    torch.manual_seed(0)
    pkg = save_package(build_network(arch), {"name": "fa", "architecture": arch, "input_contract": contract,
                                             "recommended_method": "anatomy", "calibration": {},
                                             "provenance": {"trained_on": "nothing (random weights)"}},
                       tmp_path / "fa", card="# test\n")
    labels = parcellation((24, 30, 28))
    t1 = sitk.GetImageFromArray(t1_of(labels, 1))
    flair = sitk.GetImageFromArray(np.where(labels == GREY, t1_of(labels, 2) * 1.9, t1_of(labels, 2)))
    for img in (t1, flair):
        img.SetSpacing((4.0, 4.0, 4.0))
    mask = sitk.Cast(t1 > 0, sitk.sitkUInt8)
    both = score_volume(flair, pkg, ["anatomy"], mask=mask, study={"flair": flair, "t1": t1})
    alone = score_volume(flair, pkg, ["anatomy"], mask=mask, study={"flair": flair})
    assert both.info["tissue_classes_from"] == "t1" and alone.info["tissue_classes_from"] == "flair"
    assert not np.array_equal(both.maps["anatomy"], alone.maps["anatomy"])
