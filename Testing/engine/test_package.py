"""Model packages: safetensors + JSON, hashes checked, clear errors, never pickle."""

import json
import shutil

import pytest
import torch

from anomaly_localizer.errors import PackageError
from anomaly_localizer.core.package import load_package, update_meta
from anomaly_localizer.core.package import resolve_package

from phantoms import make_tiny_package


@pytest.fixture()
def pkg(tmp_path):
    return make_tiny_package(tmp_path / "tiny", seed=5)


def test_round_trip_gives_the_same_weights(pkg):
    torch.manual_seed(5)
    from anomaly_localizer.core.package import build_network as build_model
    from phantoms import TINY_ARCH
    original = build_model(TINY_ARCH)
    loaded = load_package(pkg.path).load_model()
    for (k, a), (_, b) in zip(original.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k


def test_weights_are_safetensors_not_pickle(pkg):
    raw = (pkg.path / "model.safetensors").read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + header_len])
    assert any(k.startswith("encoder.") for k in header)
    assert not raw.startswith(b"PK") and b"\x80\x02" not in raw[:2]  # neither zip nor pickle


def test_tampered_weights_are_refused(pkg):
    data = bytearray((pkg.path / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (pkg.path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(PackageError, match="SHA-256"):
        load_package(pkg.path)


def test_truncated_weights_are_refused(pkg):
    f = pkg.path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(PackageError, match="truncated or modified"):
        load_package(pkg.path)


def test_edited_description_is_refused(pkg):
    meta = json.loads((pkg.path / "model.json").read_text())
    meta["calibration"] = {"pixel": {"rec": {"thresholds": [{"fpr": 0.001, "value": 0.0}]}}}
    (pkg.path / "model.json").write_text(json.dumps(meta))
    with pytest.raises(PackageError, match="model.json does not match"):
        load_package(pkg.path)


def test_missing_file_unknown_format_and_not_a_package(pkg, tmp_path):
    (pkg.path / "README.md").unlink()
    with pytest.raises(PackageError, match="missing"):
        load_package(pkg.path)
    with pytest.raises(PackageError, match="not a model package"):
        load_package(tmp_path)
    other = tmp_path / "other"
    shutil.copytree(pkg.path.parent / "tiny", other)
    (other / "manifest.json").write_text(json.dumps({"format": "someone-else/7", "files": {}}))
    with pytest.raises(PackageError, match="unknown package format"):
        load_package(other)
    (other / "manifest.json").write_text("{not json")
    with pytest.raises(PackageError, match="not valid JSON"):
        load_package(other)


def test_unknown_architecture_is_refused(pkg):
    meta = json.loads((pkg.path / "model.json").read_text())
    meta["architecture"]["type"] = "diffusion"
    update_meta(pkg.path, meta)
    with pytest.raises(PackageError, match="unknown architecture"):
        load_package(pkg.path)


def test_weights_that_do_not_fit_the_architecture_are_refused(pkg):
    meta = json.loads((pkg.path / "model.json").read_text())
    meta["architecture"]["latent_size"] = 9
    update_meta(pkg.path, meta)
    with pytest.raises(PackageError, match="do not match the architecture"):
        load_package(pkg.path).load_model()


def test_models_are_found_by_name_in_the_model_folders(pkg, monkeypatch):
    monkeypatch.setenv("ANOMALY_LOCALIZER_MODELS", str(pkg.path.parent))
    assert resolve_package("tiny").path == pkg.path
    with pytest.raises(PackageError, match="unknown model 'nope'"):
        resolve_package("nope")
