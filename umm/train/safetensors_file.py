"""Whether a safetensors file is whole, from its header alone.

A safetensors file is an 8-byte header length, a JSON header and the tensor bytes; the header's
largest data offset fixes the file's exact size. Reading the header and comparing sizes costs a few
kilobytes and catches truncation (a partial copy, a full disk), which reading would otherwise
report as a raw error or, with plain file reads, not at all.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Optional

from umm.errors import UmmError

MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header


class DamagedFileError(UmmError, OSError):
    """A safetensors file that is not whole."""


def safetensors_problem(path: Path) -> Optional[str]:
    """Why ``path`` is not a whole safetensors file, or None when it is."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"it has {size} bytes, less than a safetensors header"
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                return f"it has {size} bytes, its header alone claims {8 + n}"
            header = json.loads(f.read(n))
    except FileNotFoundError:
        return "it is missing"
    except OSError as e:
        return f"it cannot be read ({e.strerror or e})"
    except (ValueError, UnicodeDecodeError):
        return "its header is not valid JSON"
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (TypeError, KeyError, IndexError, ValueError, AttributeError):
        return "its header lists no valid data offsets"
    if 8 + n + end != size:
        return f"it has {size} bytes, its header needs {8 + n + end} (truncated or partly copied)"
    return None
