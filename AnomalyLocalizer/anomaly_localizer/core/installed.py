"""Choosing among the installed model packages: every package with what makes one unusable
(a fused model's changed component included), and which model offers the methods a user asks
for. A package itself, and finding one by name in the model folders, is :mod:`.package`'s."""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError, PackageError
from . import detectors
from .package import (
    ALL_METHODS,
    ModelPackage,
    default_model_name,
    list_packages,
    load_package,
    resolve_package,
    shadow_advice,
)


def scan_packages() -> tuple[list[ModelPackage], list[tuple[Path, str]]]:
    """Every installed package that loads, and (path, reason) for each one that does not:
    one broken package never hides the others."""
    good, broken = [], []
    for path in list_packages():
        try:
            package = load_package(path)
            package.check_components()  # a fused model whose components changed is as unusable
            good.append(package)
        except PackageError as exc:
            broken.append((path, str(exc) + shadow_advice(path)))
    return good, broken


def check_methods(methods: list[str] | tuple[str, ...], package: ModelPackage | None = None) -> list[str]:
    """Known, distinct methods, and (given a package) ones that package offers."""
    unknown = [m for m in methods if m not in ALL_METHODS]
    if unknown:
        raise InputError(f"unknown method {', '.join(unknown)}; choose from {', '.join(ALL_METHODS)}")
    if not methods:
        raise InputError(f"no method given; choose from {', '.join(ALL_METHODS)}")
    if package is not None:
        missing = [m for m in methods if m not in package.methods]
        if missing:
            raise InputError(f"model {package.name} does not offer {', '.join(missing)} (it offers "
                             f"{', '.join(package.methods) or 'no anomaly methods'}); choose a model that does "
                             "(anomaly-localizer models)")
    return list(dict.fromkeys(methods))


def resolve_package_for(methods: list[str] | tuple[str, ...] | None, model: str | None = None) -> ModelPackage:
    """The model to run ``methods`` with: ``model`` if given (it must offer them), else the
    default model if it offers them all, else the first installed model that does. A fused
    model's components are checked here, before any work."""
    wanted = [m for m in (methods or []) if m]
    unknown = [m for m in wanted if m not in ALL_METHODS]
    if unknown:
        raise PackageError(f"unknown method {', '.join(unknown)}; choose from {', '.join(ALL_METHODS)}")
    if model is not None or not wanted:
        package = resolve_package(model)
        missing = [m for m in wanted if m not in package.methods]
        if missing:
            raise PackageError(f"model {package.name} does not offer {', '.join(missing)} (it offers "
                               f"{', '.join(package.methods) or 'no anomaly methods'}); "
                               f"{_who_offers(missing)}")
        package.check_components()  # a fused model's changed component is refused before any work
        return package
    default = default_model_name()
    candidates = ([default] if default else []) + [p.name for p in list_packages() if p.name != default]
    broken = []
    for name in candidates:
        try:
            package = resolve_package(name)
            package.check_components()
        except PackageError as exc:
            broken.append(str(exc))  # said first below: a broken model may be the one that was wanted
            continue
        composite = package.detector is not None and package.detector.composite
        if composite and not any(m in package.detector.methods for m in wanted):
            continue  # a fused model's component maps, asked for alone, come from their own models
        if all(m in package.methods for m in wanted):
            return package
    if broken:
        raise PackageError(f"{'; '.join(broken)}. No other installed model offers {', '.join(wanted)} together; "
                           f"{_who_offers(wanted)}")
    raise PackageError(f"no installed model offers {', '.join(wanted)} together; {_who_offers(wanted)}")


def _who_offers(methods: list[str]) -> str:
    """Which kind of model each method needs, as advice."""
    groups: dict[str, list[str]] = {}
    for m in methods:
        d = detectors.detector_of_method(m)
        groups.setdefault(d.example_model if d else "another model", []).append(m)
    parts = [f"{', '.join(ms)} need{'s' if len(ms) == 1 else ''} {kind}" for kind, ms in groups.items()]
    advice = "run them in separate calls" if len(groups) > 1 else "pass such a model with --model, or leave --model out"
    return "; ".join(parts) + f": {advice}"
