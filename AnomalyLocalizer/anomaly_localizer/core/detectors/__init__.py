"""The registry of detector families: one module per family in this folder.

Every module here that does not start with ``_`` and defines ``DETECTOR`` (an instance of
:class:`~anomaly_localizer.core.detectors.base.Detector`) is a family; nothing else needs
to change when one is added. The registry answers which family scores an architecture
type, which methods exist, and which family offers a method.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import lru_cache

from .base import Detector, DetectorOutput, ScoringContext

__all__ = ["Detector", "DetectorOutput", "ScoringContext", "all_detectors", "detector_for", "detector_of_method",
           "all_methods", "anomaly_types"]


@lru_cache(maxsize=1)
def all_detectors() -> tuple[Detector, ...]:
    """Every detector family, in module name order (vae before lsr by explicit order below)."""
    found = []
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_") or info.name == "base":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        detector = getattr(module, "DETECTOR", None)
        if isinstance(detector, Detector):
            found.append(detector)
    # Families declare their place in listings (the seed methods first); ties by name.
    found.sort(key=lambda d: (getattr(d, "order", 100), d.name))
    return tuple(found)


def detector_for(arch_type: str | None) -> Detector | None:
    """The family that scores models of this architecture type, or None."""
    for d in all_detectors():
        if arch_type in d.types:
            return d
    return None


def detector_of_method(method: str) -> Detector | None:
    for d in all_detectors():
        if method in d.methods:
            return d
    return None


def all_methods() -> tuple[str, ...]:
    return tuple(m for d in all_detectors() for m in d.methods)


def anomaly_types() -> tuple[str, ...]:
    return tuple(t for d in all_detectors() for t in d.types)
