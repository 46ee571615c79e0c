"""Write a safetensors file one tensor at a time.

``safetensors.torch.save_file`` needs every tensor in memory at once (29 GB for BAGEL-7B-MoT in
bf16). The format is a JSON header of dtypes, shapes and byte offsets, then the raw little-endian
bytes back to back; shapes and dtypes are known before any data is read, so the header is
written first and each tensor is appended as it comes.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Dict, Iterable, Mapping, Optional, Sequence, Tuple

import torch

from umm.train.safetensors_file import DTYPE_NAMES


class StreamWriter:
    """``with StreamWriter(path, layout) as w: w.write(key, tensor)`` for every key, in layout order.

    ``layout`` maps keys to (dtype, shape); the file is only complete when every key was written.
    """

    def __init__(self, path: Path, layout: Mapping[str, Tuple[torch.dtype, Sequence[int]]],
                 metadata: Optional[Dict[str, str]] = None):
        self.path, self.layout = Path(path), dict(layout)
        header: Dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        for key, (dtype, shape) in self.layout.items():
            size = torch.Size(shape).numel() * dtype.itemsize
            header[key] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it
        self._order = iter(self.layout)
        self._file = open(self.path, "wb")
        self._file.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, key: str, tensor: torch.Tensor) -> None:
        expected = next(self._order, None)
        dtype, shape = self.layout.get(key, (None, None))
        if key != expected or tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"{self.path}: got {key} {tensor.dtype} {tuple(tensor.shape)}, expected {expected} "
                             f"{dtype} {tuple(shape or ())}")
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        self._file.write(memoryview(flat.view(torch.uint8).numpy()))

    def __enter__(self) -> "StreamWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._file.close()
        left = next(self._order, None)
        if exc_type is None and left is not None:
            raise ValueError(f"{self.path}: {left} and maybe more tensors were never written")


def write_streamed(path: Path, layout: Mapping[str, Tuple[torch.dtype, Sequence[int]]],
                   tensors: Iterable[Tuple[str, torch.Tensor]]) -> Path:
    with StreamWriter(path, layout) as w:
        for key, tensor in tensors:
            w.write(key, tensor)
    return Path(path)
