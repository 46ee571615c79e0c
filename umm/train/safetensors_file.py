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
from typing import Any, Dict, Optional, Tuple

import torch

from umm.errors import UmmError

MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header
# The header's dtype names, both ways.
DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
DTYPES_BY_NAME = {name: dtype for dtype, name in DTYPE_NAMES.items()}


class DamagedFileError(UmmError, OSError):
    """A safetensors file that is not whole."""


def _inspect(path: Path) -> Tuple[Optional[str], int, Dict[str, Any]]:
    """(why ``path`` is not a whole safetensors file or None, its header length, its header)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"it has {size} bytes, less than a safetensors header", 0, {}
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                return f"it has {size} bytes, its header alone claims {8 + n}", 0, {}
            header = json.loads(f.read(n))
    except FileNotFoundError:
        return "it is missing", 0, {}
    except OSError as e:
        return f"it cannot be read ({e.strerror or e})", 0, {}
    except (ValueError, UnicodeDecodeError):
        return "its header is not valid JSON", 0, {}
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (TypeError, KeyError, IndexError, ValueError, AttributeError):
        return "its header lists no valid data offsets", 0, {}
    if 8 + n + end != size:
        return f"it has {size} bytes, its header needs {8 + n + end} (truncated or partly copied)", 0, {}
    return None, n, header


def safetensors_problem(path: Path) -> Optional[str]:
    """Why ``path`` is not a whole safetensors file, or None when it is."""
    return _inspect(Path(path))[0]


def read_header(path: Path, fix: str) -> Tuple[int, Dict[str, Any]]:
    """(header length, header) of a whole safetensors file; else one line naming it, what is wrong
    and ``fix``."""
    problem, n, header = _inspect(Path(path))
    if problem is not None:
        raise DamagedFileError(f"{path} is damaged: {problem}; {fix}")
    return n, header
