"""Write a safetensors file one tensor at a time, from wherever the tensors live.

``safetensors.torch.save_file`` needs every tensor in host memory at once: 29 GB for an export of
BAGEL-7B-MoT in bf16, and for a checkpoint's shard on the GPU a whole host copy made through
pageable memory (16 s for UniCoT's 19 GiB shard on an H100, BENCHMARKS.md) before the disk sees a
byte. The format is a JSON header of dtypes, shapes and byte offsets, then the raw little-endian
bytes back to back; shapes and dtypes are known before any data is read, so the header is written
first and each tensor is appended as it comes. A GPU tensor goes to the file in chunks through one
small page-locked buffer, so a synchronous save is bounded by the disk and holds no copy.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch

from umm.train.safetensors_file import DTYPE_NAMES

BOUNCE_BYTES = 256 * 2**20  # page-locked once per process (about 0.1 s), reused by every write and load
_bounce: Optional[torch.Tensor] = None  # main thread only (background writers write host tensors)


def widest_first(dtypes: Mapping[str, torch.dtype]) -> List[str]:
    """The keys, widest dtype first (stable): tensors back to back in this order all stay aligned
    with no padding (a file mapped into memory gives aligned tensors), as safetensors orders them."""
    return sorted(dtypes, key=lambda key: -dtypes[key].itemsize)


def bounce_buffer() -> torch.Tensor:
    """The process's page-locked buffer between GPU tensors and files: this writer's chunks, and the
    weight loader's (umm/train/materialize.py, in two halves). Main thread only."""
    global _bounce
    if _bounce is None:
        _bounce = torch.empty(BOUNCE_BYTES, dtype=torch.uint8, pin_memory=True)
    return _bounce


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
        dtype, shape = self.layout.get(expected, (None, None))
        if key != expected or tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"{self.path}: got {key} {tensor.dtype} {tuple(tensor.shape)}, expected {expected} "
                             f"{dtype} {tuple(shape or ())}")
        if tensor.numel() == 0:
            return
        raw = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        if not raw.is_cuda:
            self._file.write(memoryview(raw.to("cpu").numpy()))
            return
        bounce = bounce_buffer()
        for start in range(0, raw.numel(), BOUNCE_BYTES):
            chunk = raw[start:start + BOUNCE_BYTES]
            part = bounce[:chunk.numel()]
            part.copy_(chunk)  # blocking: the bytes are in place before the file reads them
            self._file.write(memoryview(part.numpy()))

    def write_data(self, data: torch.Tensor) -> None:
        """Every tensor at once: ``data``, their bytes back to back in layout order."""
        size = sum(torch.Size(shape).numel() * dtype.itemsize for dtype, shape in self.layout.values())
        if data.dtype != torch.uint8 or data.numel() != size or data.is_cuda:
            raise ValueError(f"{self.path}: a data buffer of {size} host bytes was expected, got {data.numel()} "
                             f"{data.dtype} on {data.device}")
        self._file.write(memoryview(data.numpy()))
        self._order = iter(())

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


def write_tensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Optional[Dict[str, str]] = None,
                  data: Optional[torch.Tensor] = None) -> Path:
    """``tensors`` (CPU or CUDA, any strides) to ``path``, in :func:`widest_first` order. ``data``: a
    CPU buffer that already holds their bytes back to back in that order (umm/train/sharded_state.py's
    HostCopies): written with one call."""
    order = widest_first({k: t.dtype for k, t in tensors.items()})
    with StreamWriter(path, {k: (tensors[k].dtype, tensors[k].shape) for k in order}, metadata) as w:
        if data is None:
            for key in order:
                w.write(key, tensors[key])
        else:
            w.write_data(data)
    return Path(path)
