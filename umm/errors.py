"""The errors a user fixes (a path, a setting, a file, a stage order), not bugs in umm.

Every such error class derives from :class:`UmmError`. The app and the torchrun worker print one as
one line (its class and message: what is wrong, where, and what would fix it) and exit non-zero,
without a traceback; any other exception keeps its traceback.
"""
from __future__ import annotations


class UmmError(Exception):
    """An error in the user's input or environment, with a message that says how to fix it."""


class MissingFileError(UmmError, FileNotFoundError):
    """A file or directory the run needs does not exist."""


def one_line(err: BaseException) -> str:
    """``ClassName: message`` on one line."""
    return f"{type(err).__name__}: {' '.join(str(err).split())}"


class DataConfigError(UmmError, ValueError):
    """Datasets that cannot feed the run as configured (none, no rows, too few rows for its streams,
    weights summing to zero, a kind the recipe does not train on)."""
