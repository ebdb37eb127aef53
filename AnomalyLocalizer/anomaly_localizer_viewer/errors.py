"""The viewer's one error type and how any exception becomes the page's one line."""

from __future__ import annotations


class ViewerError(Exception):
    """A one-line message for the page: what was wrong and what to do."""


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (the page shows one line)."""
    text = str(exc).strip() or type(exc).__name__
    return " ".join(line.strip() for line in text.splitlines() if line.strip())
