"""Fixtures for the Slicer logic tests; skipped as a whole without slicer-core."""

import pytest

pytest.importorskip("slicer", reason="slicer-core is not installed (make test installs it)")

from logic_helpers import SlicerApp  # noqa: E402


@pytest.fixture()
def slicerApp():
    return SlicerApp()
