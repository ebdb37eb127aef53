"""Which of the engine's Python packages Slicer's Python still lacks (no Qt, no Slicer).

Slicer ships numpy and SimpleITK; PyTorch, safetensors and pydantic are installed on first
use, with the user's consent. A package counts as present only when its installed version
meets the engine's requirement (the same bounds as pyproject.toml, which a test compares):
an older torch, or pydantic 1.x that another extension installed, is as good as missing.
Nothing is imported to find out (importing torch into Slicer's process takes seconds and
memory); the installed distributions' metadata say it. What to install, in which order and
with which installer is decided here too (:func:`install_unmet`); the panel only asks.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
from dataclasses import dataclass
from typing import Any, Callable, Optional

# The engine's requirements that Slicer does not ship: import name -> (distribution, specifier).
REQUIREMENTS = {
    "torch": ("torch", ">=2.1,<3"),
    "safetensors": ("safetensors", ">=0.4"),
    "pydantic": ("pydantic", ">=2.7,<3"),
}


@dataclass(frozen=True)
class Unmet:
    """One requirement the running Python does not meet."""

    name: str
    specifier: str
    installed: Optional[str]  # the installed version, or None when not installed

    @property
    def requirement(self) -> str:
        """The pip requirement string, e.g. ``pydantic>=2.7,<3``."""
        return f"{REQUIREMENTS[self.name][0]}{self.specifier}"

    def describe(self) -> str:
        found = "not installed" if self.installed is None else f"{self.installed} installed"
        return f"{self.requirement} ({found})"


def _release(version: str) -> tuple[int, ...]:
    """The numeric release of a version (``2.13.0+cpu`` -> (2, 13, 0); ``2.7.0rc1`` -> (2, 7, 0))."""
    parts = []
    for piece in version.split("+")[0].split("."):
        digits = re.match(r"\d+", piece)
        if digits is None:
            break
        parts.append(int(digits.group()))
        if digits.end() < len(piece):  # a pre-release or post tag ends the release
            break
    return tuple(parts)


def satisfies(version: str, specifier: str) -> bool:
    """Whether ``version`` meets a specifier of ``>=``, ``>``, ``<``, ``<=``, ``==`` and
    ``!=`` clauses over release numbers (all the engine's requirements use)."""
    have = _release(version)
    for clause in filter(None, (c.strip() for c in specifier.split(","))):
        op, bound = re.match(r"(>=|<=|==|!=|>|<)\s*(.+)", clause).groups()
        want = _release(bound)
        width = max(len(have), len(want))
        a, b = have + (0,) * (width - len(have)), want + (0,) * (width - len(want))
        if not {">=": a >= b, "<=": a <= b, "==": a == b, "!=": a != b, ">": a > b, "<": a < b}[op]:
            return False
    return True


def installed_version(name: str) -> Optional[str]:
    """The installed version of an import name's distribution, None when not importable."""
    if importlib.util.find_spec(name) is None:
        return None
    try:
        return importlib.metadata.version(REQUIREMENTS[name][0])
    except importlib.metadata.PackageNotFoundError:
        return None


def unmet_requirements() -> list[Unmet]:
    """The engine's requirements this Python does not meet, in install order (torch first)."""
    unmet = []
    for name, (_, specifier) in REQUIREMENTS.items():
        version = installed_version(name)
        if version is None or not satisfies(version, specifier):
            unmet.append(Unmet(name, specifier, version))
    return unmet


def consent_text(unmet: list[Unmet]) -> str:
    """What the user is asked before anything is installed."""
    return ("AnomalyLocalizer needs these Python packages: " + "; ".join(u.describe() for u in unmet)
            + ". Install them now? PyTorch downloads several hundred MB (more with GPU support) "
              "and may take a few minutes.")


def install_unmet(unmet: list[Unmet], pip_install: Callable[[list[str]], Any],
                  install_torch: Optional[Callable[[str], Any]] = None) -> None:
    """Install ``unmet`` at the engine's bounds: PyTorch with ``install_torch(specifier)``
    when given (Slicer's PyTorch extension, which picks the build for the computer's GPU),
    else with ``pip_install``, as the others; then check again, and say what is still unmet
    (e.g. pydantic 1.x already imported into Slicer by another extension) in a RuntimeError.
    The installers are Slicer's (``slicer.util.pip_install``), passed in by the panel."""
    torch = next((u for u in unmet if u.name == "torch"), None)
    if torch is not None:
        if install_torch is not None:
            install_torch(torch.specifier)
        else:
            pip_install([torch.requirement])
    others = [u.requirement for u in unmet if u.name != "torch"]
    if others:
        pip_install(others)
    still = unmet_requirements()
    if still:
        raise RuntimeError("still unmet: " + "; ".join(u.describe() for u in still)
                           + ". Restart Slicer and press Apply again.")
