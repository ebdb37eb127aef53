"""Fixtures of the engine tests (helpers live in phantoms.py, importable by name)."""

import pytest

from phantoms import make_tiny_lsr_package, make_tiny_package


@pytest.fixture(scope="session")
def tiny_package(tmp_path_factory):
    return make_tiny_package(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def tiny_lsr_package(tmp_path_factory):
    return make_tiny_lsr_package(tmp_path_factory.mktemp("models") / "tiny-lsr")
