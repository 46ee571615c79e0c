"""Directories umm writes data into (the synthetic sets under ``data.root``, ``--out`` of the scripts):
umm only ever replaces a directory it made itself.

A generated set is built in a hidden sibling ``.<name>.tmp-<pid>`` and renamed into place. The place
may be absent, an empty directory, or a directory carrying umm's marker (``COMPLETE``, JSON naming a
``umm.`` generator); anything else is the user's, and ``NotUmmsError`` stops before anything is
touched.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

from umm.errors import UmmError

MARKER = "COMPLETE"


class NotUmmsError(UmmError, FileExistsError):
    """A directory umm was asked to write into holds files umm did not make."""


def read_marker(out) -> Optional[Dict[str, Any]]:
    """The settings in ``out``'s marker when umm made ``out``, else None."""
    try:
        marker = json.loads((Path(out) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(marker, dict) and str(marker.get("generator", "")).startswith("umm.")
    return marker if ok else None


# The fix when the dir is data.root (data.synthesize writes the synthetic set there).
DATA_ROOT_FIX = ("point data.root at an empty or new directory, or set data.synthesize=false to read your own "
                 "data there")
# The fix anywhere else (``--out`` of the scripts).
NEW_DIR_FIX = "point it at an empty or new directory"


def check_writable(out, what: str, fix: str = NEW_DIR_FIX) -> None:
    """Raise unless umm may (re)write ``out``: absent, an empty directory, or one umm made."""
    out = Path(out)
    if not out.exists() or read_marker(out) is not None:
        return
    if not out.is_dir():
        raise NotUmmsError(f"{what} {out} is a file, not a directory; nothing was changed: {fix}")
    if any(out.iterdir()):
        raise NotUmmsError(f"{what} {out} holds files umm did not make (no umm {MARKER} marker); nothing was "
                           f"changed: {fix}")


def temp_dir(out) -> Path:
    """A fresh hidden sibling of ``out`` for this process to build in."""
    out = Path(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)  # left by an earlier process of this pid: its name is umm's
    tmp.mkdir(parents=True)
    return tmp


def commit(tmp: Path, out, what: str) -> None:
    """Move the finished ``tmp`` to ``out``, replacing only an empty directory or a set umm made."""
    out = Path(out)
    try:
        check_writable(out, what)  # again: another process may have written there meanwhile
    except NotUmmsError:
        shutil.rmtree(tmp)
        raise
    if read_marker(out) is not None:
        shutil.rmtree(out)
    elif out.is_dir():
        out.rmdir()  # empty
    os.replace(tmp, out)
