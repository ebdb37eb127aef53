"""The pieces of a reader's session: a series of the study on show, a run's status, and the
slice views' and unpacked archives' small rules."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from AnomalyLocalizerLib.inputs import ContrastGuess


@dataclass
class Series:
    """One series of the study on show: its volume node, its name on the page, its contrast
    as recognised when it was opened, the contrast the reader chose (None: the recognised
    one), and what the last run recorded of it (summary.json's row for it)."""

    node: Any
    label: str
    recognised: ContrastGuess
    chosen: str | None = None
    read: dict = field(default_factory=dict)

    @property
    def contrast(self) -> str | None:
        return self.chosen or self.recognised.contrast



@dataclass
class RunStatus:
    state: str  # idle | running | done | failed | cancelled
    progress: float = 0.0
    message: str = ""


def prepareSliceViews(views) -> None:
    """Slice views draw images, which multisampling does not improve; trame-slicer asks for 8x
    multisampling, which made each redraw several times slower with software OpenGL (servers
    without a GPU): three 512x512 views took 63 ms unchanged with it, 12 ms without. Call
    before the views first draw."""
    for view in views:
        view.render_window().SetMultiSamples(0)


def series_folder(root: Path) -> Path:
    """The folder of an unpacked archive that holds the files: archives often wrap a series
    in one or more folders of their own."""
    while True:
        entries = [e for e in root.iterdir() if not e.name.startswith((".", "__MACOSX"))]
        if len(entries) != 1 or not entries[0].is_dir():
            return root
        root = entries[0]
