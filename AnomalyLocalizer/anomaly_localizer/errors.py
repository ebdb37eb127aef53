"""Errors the engine raises for problems a user can fix.

Each message names what was wrong and what to do, in one line, so the command line can
print it as is and the Slicer module can show it in a dialog.
"""


class AnomalyLocalizerError(Exception):
    """Base class: a problem with the user's input, model or options (not a bug)."""


class InputError(AnomalyLocalizerError):
    """The image, mask or an option cannot be used."""


class PackageError(AnomalyLocalizerError):
    """A model package is missing, unknown, truncated or has been modified."""


class CancelledError(AnomalyLocalizerError):
    """The caller asked to stop a running job."""
