"""One hierarchy of errors for everything headreg raises on purpose.

`HeadregError` is the root. An unknown name is also a `LookupError`, a bad value
also a `ValueError`, so callers that catch the builtin families keep working.
Only the CLI turns these into `click.ClickException`.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = [
    "HeadregError",
    "UnknownNameError",
    "UnknownHeadError",
    "UnknownBackboneError",
    "UnknownDatasetError",
    "InvalidValueError",
    "InvalidInputError",
    "DuplicateHeadError",
    "PluginError",
    "CheckpointError",
    "DatasetNotFoundError",
    "RunLockedError",
    "DataFileError",
    "ExportError",
    "MissingExtraError",
    "did_you_mean",
]


class HeadregError(Exception):
    """Root of every error headreg raises on purpose."""


class UnknownNameError(HeadregError, LookupError):
    """A name (head, backbone, dataset, metric) that nothing registered."""

    def __str__(self) -> str:  # LookupError/KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class UnknownHeadError(UnknownNameError):
    """A head name that no built-in or plugin registered."""


class UnknownBackboneError(UnknownNameError):
    """A backbone name that neither timm, torchvision nor headreg knows."""


class UnknownDatasetError(UnknownNameError):
    """A dataset name headreg does not know."""


class InvalidValueError(HeadregError, ValueError):
    """An option or argument with a value out of its range or of the wrong type."""


class InvalidInputError(InvalidValueError):
    """A tensor given to a head, metric or model with the wrong shape, dtype or values."""


class DuplicateHeadError(HeadregError):
    """Two sources registered the same head name."""


class PluginError(HeadregError):
    """A plugin failed to import, raised in its hook, or registered something unusable."""


class CheckpointError(HeadregError):
    """A checkpoint that is missing, truncated, or does not fit the model asked for."""


class DatasetNotFoundError(HeadregError, FileNotFoundError):
    """A dataset that is not on disk where headreg looked for it."""

    def __str__(self) -> str:  # OSError formats its args otherwise
        return str(self.args[0]) if self.args else ""


class RunLockedError(HeadregError):
    """A run (or comparison) directory that another headreg process is writing."""


class DataFileError(HeadregError):
    """A file of a dataset (an image in an image folder) that cannot be read or decoded."""


class ExportError(HeadregError):
    """An exported model that could not be written, or that does not compute what the model it came from does."""


class MissingExtraError(HeadregError, ImportError):
    """An optional feature whose packages are not installed; the message names the pip extra."""


def did_you_mean(name: str, candidates: Iterable[str], n: int = 3) -> str:
    """Return ``"; did you mean 'x' or 'y'?"`` for close matches of ``name``, or ``""``."""
    close = difflib.get_close_matches(name, list(candidates), n=n, cutoff=0.6)
    if not close:
        return ""
    quoted = [f"'{c}'" for c in close]
    if len(quoted) == 1:
        return f"; did you mean {quoted[0]}?"
    return "; did you mean " + ", ".join(quoted[:-1]) + f" or {quoted[-1]}?"
