"""The first-use install check: every package the engine needs beyond Slicer's own, with the
engine's own version bounds, found without importing it."""

import importlib.metadata
import re
import sys
from pathlib import Path

import pytest

from AnomalyLocalizerLib import install

ROOT = Path(__file__).resolve().parents[2]


def test_requirements_are_the_engines_own_bounds():
    pyproject = (ROOT / "pyproject.toml").read_text()
    declared = dict(re.findall(r'^\s+"([A-Za-z0-9_-]+)([<>=!][^"]*)",', pyproject, re.M))
    for name, (dist, specifier) in install.REQUIREMENTS.items():
        assert declared.get(dist) == specifier, f"{dist}: pyproject.toml says {declared.get(dist)!r}"
    # Everything else the engine imports in Slicer, Slicer ships (numpy, SimpleITK).
    assert set(declared) - {d for d, _ in install.REQUIREMENTS.values()} == {"numpy", "SimpleITK", "distributed"}


@pytest.mark.parametrize("version, specifier, ok", [
    ("2.13.0+cpu", ">=2.1,<3", True), ("2.0.1", ">=2.1,<3", False), ("3.0", ">=2.1,<3", False),
    ("1.10.13", ">=2.7,<3", False), ("2.7.0rc1", ">=2.7,<3", True), ("2.12.5", ">=2.7,<3", True),
    ("0.4", ">=0.4", True), ("0.3.9", ">=0.4", False), ("2.1", "==2.1.0", True), ("2.1.1", "!=2.1.1", False),
])
def test_version_bounds(version, specifier, ok):
    assert install.satisfies(version, specifier) is ok


def test_this_environment_meets_every_requirement():
    assert install.unmet_requirements() == []


def test_a_missing_or_too_old_package_is_unmet_and_nothing_is_imported(monkeypatch):
    real = importlib.metadata.version
    monkeypatch.setattr(install.importlib.metadata, "version",
                        lambda dist: "1.10.13" if dist == "pydantic" else real(dist))
    real_find = install.importlib.util.find_spec
    monkeypatch.setattr(install.importlib.util, "find_spec",
                        lambda name: None if name == "safetensors" else real_find(name))
    imported_before = set(sys.modules)
    unmet = install.unmet_requirements()
    assert [u.name for u in unmet] == ["safetensors", "pydantic"]
    assert unmet[0].describe() == "safetensors>=0.4 (not installed)"
    assert unmet[1].describe() == "pydantic>=2.7,<3 (1.10.13 installed)"
    assert unmet[1].requirement == "pydantic>=2.7,<3"
    assert set(sys.modules) == imported_before


def test_what_is_unmet_is_installed_torch_first_through_the_pytorch_extension_when_there(monkeypatch):
    """The panel only asks (install.consent_text) and passes Slicer's installers in; what to
    install, in which order and with which installer is install_unmet's."""
    unmet = [install.Unmet("torch", ">=2.1,<3", None), install.Unmet("pydantic", ">=2.7,<3", "1.10.13")]
    assert "torch>=2.1,<3 (not installed)" in install.consent_text(unmet)
    calls = []
    monkeypatch.setattr(install, "unmet_requirements", lambda: [])
    install.install_unmet(unmet, lambda reqs: calls.append(("pip", reqs)), lambda spec: calls.append(("torch", spec)))
    assert calls == [("torch", ">=2.1,<3"), ("pip", ["pydantic>=2.7,<3"])]
    calls.clear()
    install.install_unmet(unmet, lambda reqs: calls.append(("pip", reqs)))  # no PyTorch extension: pip for all
    assert calls == [("pip", ["torch>=2.1,<3"]), ("pip", ["pydantic>=2.7,<3"])]
    monkeypatch.setattr(install, "unmet_requirements", lambda: unmet[1:])  # pydantic 1.x still imported
    with pytest.raises(RuntimeError, match="still unmet: pydantic>=2.7,<3 .* Restart Slicer"):
        install.install_unmet(unmet[1:], lambda reqs: None)
