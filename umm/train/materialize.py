"""Fill a model built on the meta device (and maybe sharded by FSDP2) from safetensors files.

Each rank allocates only what it keeps (``to_empty``: its FSDP2 shards, replicated buffers) and
reads, per tensor, only the bytes of its shard's rows (:class:`RowReader`). So a node's host memory
holds about one model, not one per rank, and no device ever holds a whole unsharded tensor of a
sharded parameter.
"""
from __future__ import annotations

import contextlib
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from umm.model.io import CheckpointMismatchError, check_state_dict
from umm.train.safetensors_file import DTYPES_BY_NAME, DamagedFileError, read_header
from umm.train.stream_safetensors import BOUNCE_BYTES, bounce_buffer
from umm.train.distributed import local


class RowReader:
    """Rows of the tensors of a safetensors file, read with plain file reads.

    Not ``safe_open``: it memory-maps the file, and every page a rank touches stays in that rank's
    resident memory until the file is closed, so each rank would end up holding its shards twice.
    """

    def __init__(self, path):
        self.path = str(path)
        # Checked whole first: plain reads past a truncated end would give zeros, not an error.
        n, header = read_header(Path(path), "copy or write it again")
        self._file = open(self.path, "rb")
        self.metadata: Dict[str, str] = header.pop("__metadata__", None) or {}
        self._base = 8 + n
        self._meta = header

    def __enter__(self) -> "RowReader":
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()

    def keys(self) -> List[str]:
        return list(self._meta)

    def shape(self, key: str) -> Tuple[int, ...]:
        return tuple(self._meta[key]["shape"])

    def dtype(self, key: str) -> torch.dtype:
        return DTYPES_BY_NAME[self._meta[key]["dtype"]]

    def rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of dim 0 (the whole tensor for a 0-dim one), in host memory."""
        shape = self.shape(key)
        out = torch.empty((stop - start, *shape[1:]) if shape else (), dtype=self.dtype(key))
        self.read_into(key, start, stop, out)
        return out

    def read_into(self, key: str, start: int, stop: int, out: torch.Tensor) -> int:
        """Rows [start, stop) of ``key`` (the whole tensor for a 0-dim one) into ``out``, a contiguous
        tensor of as many elements, on any device and in any dtype; returns the bytes read. On the host
        the bytes land in ``out`` itself when the dtypes agree; a GPU gets them in chunks through the two
        halves of a page-locked buffer, so reading the next chunk overlaps copying the last."""
        meta = self._meta[key]
        dtype, shape = DTYPES_BY_NAME[meta["dtype"]], meta["shape"]
        start, stop = (0, 1) if not shape else (start, stop)
        row_bytes = math.prod(shape[1:]) * dtype.itemsize
        nbytes = (stop - start) * row_bytes
        if out.numel() * dtype.itemsize != nbytes or not out.is_contiguous():
            raise ValueError(f"{self.path}: {key} rows {start}..{stop} do not fit a contiguous tensor of shape "
                             f"{tuple(out.shape)}")
        if not nbytes:
            return 0
        self._file.seek(self._base + meta["data_offsets"][0] + start * row_bytes)
        flat = out.reshape(-1)
        if not out.is_cuda:
            into = flat if out.dtype == dtype else torch.empty(flat.numel(), dtype=dtype)
            self._read_exactly(into.view(torch.uint8), key)
            if into is not flat:
                flat.copy_(into)
            return nbytes
        per_chunk, staging = STAGING_BYTES // dtype.itemsize, _staging()
        for i, first in enumerate(range(0, flat.numel(), per_chunk)):
            n = min(per_chunk, flat.numel() - first)
            buf, copied = staging[i % 2]
            copied.synchronize()  # this half's last copy has left it
            part = buf[:n * dtype.itemsize]
            self._read_exactly(part, key)
            src = part.view(dtype)
            if out.dtype != dtype:  # converted on the GPU (copy_ would convert on the host first)
                src = src.to(out.device, non_blocking=True)
            flat[first:first + n].copy_(src, non_blocking=True)
            copied.record()
        return nbytes

    def _read_exactly(self, into: torch.Tensor, key: str) -> None:
        if self._file.readinto(memoryview(into.numpy())) != into.numel():
            raise DamagedFileError(f"{self.path} ended while reading {key}; copy or write it again")


STAGING_BYTES = BOUNCE_BYTES // 2  # a chunk: half of the process's page-locked buffer
_copied: List["torch.cuda.Event"] = []  # each half's last copy out


def _staging() -> List[Tuple[torch.Tensor, "torch.cuda.Event"]]:
    """The two halves of the page-locked buffer the checkpoint writer streams through, for reads bound
    to a GPU, each with the event of its last copy out."""
    if not _copied:
        _copied.extend(torch.cuda.Event() for _ in range(2))
    buf = bounce_buffer()
    return [(buf[i * STAGING_BYTES:(i + 1) * STAGING_BYTES], _copied[i]) for i in range(2)]


@dataclass
class WeightFile:
    """A safetensors file and the training names it provides (``key``: training name -> file key,
    or None when the name is not this file's)."""

    path: Path
    key: Callable[[str], Optional[str]]
    # Only these file keys count (a cut LLM skips the layers it does not build).
    keep: Callable[[str], bool] = lambda k: True
    # How ``path`` is read: one file, or the ranks' shards of a checkpoint (umm/train/sharded_state.py).
    open: Callable[[Path], "RowReader"] = RowReader


def persistent_tensors(model: nn.Module) -> Iterator[Tuple[str, torch.Tensor]]:
    """Parameters and persistent buffers under their state-dict names."""
    yield from model.named_parameters()
    for mod_name, mod in model.named_modules():
        for name, buf in mod.named_buffers(recurse=False):
            if buf is not None and name not in mod._non_persistent_buffers_set:
                yield (f"{mod_name}.{name}" if mod_name else name), buf


def shard_rows(t: torch.Tensor) -> Tuple[int, int]:
    """The rows [start, stop) of dim 0 that this rank holds (all of them for a plain tensor)."""
    if t.dim() == 0:
        return 0, 0
    if not hasattr(t, "device_mesh"):
        return 0, t.shape[0]
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if any(isinstance(p, Shard) and p.dim != 0 for p in t.placements):
        raise ValueError(f"only dim-0 sharding is supported, got {t.placements}")
    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return offset[0], offset[0] + shape[0]


def fresh_adapter(name: str, shape: torch.Size, seed: int) -> torch.Tensor:
    """A new LoRA tensor, the same on every rank and for every world size (seeded by its name):
    ``lora_A`` as peft's default (kaiming-uniform, a=sqrt(5): U(±1/sqrt(fan_in))), ``lora_B`` zeros."""
    if ".lora_B." in name:
        return torch.zeros(shape)
    if ".lora_A." in name:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        bound = 1.0 / shape[1] ** 0.5
        return torch.empty(shape).uniform_(-bound, bound, generator=gen)
    raise CheckpointMismatchError(f"no weights for {name}: it is in no checkpoint file and has no initialiser")


@torch.no_grad()
def materialize(model: nn.Module, files: List[WeightFile], device: torch.device, *, seed: int = 0) -> Dict[str, int]:
    """Allocate ``model``'s own storage on ``device`` and fill it from ``files`` (strict keys and
    shapes, checked from the headers before any data is read); LoRA tensors no file holds start
    fresh (:func:`fresh_adapter`). Returns how many bytes this rank read per file."""
    tensors = list(persistent_tensors(model))
    owner: Dict[str, Tuple[int, str]] = {}
    for i, wf in enumerate(files):
        with wf.open(wf.path) as f:
            header = {k: f.shape(k) for k in f.keys() if wf.keep(k)}
        expected = {}
        for name, t in tensors:
            key = wf.key(name)
            if key is not None and name not in owner:
                expected[key] = t.shape
                owner[name] = (i, key)
        check_state_dict(expected, header, str(wf.path))
    model.to_empty(device=device)
    tensors = list(persistent_tensors(model))  # to_empty may have replaced the tensor objects
    read = {str(wf.path): 0 for wf in files}
    with contextlib.ExitStack() as stack:
        handles = [stack.enter_context(wf.open(wf.path)) for wf in files]
        for name, t in tensors:
            mine, (start, stop) = local(t), shard_rows(t)
            if name in owner:
                i, key = owner[name]
                read[str(files[i].path)] += handles[i].read_into(key, start, stop, mine)
            else:
                mine.copy_(fresh_adapter(name, t.shape, seed)[start:stop].reshape(mine.shape))
        if any(t.is_cuda for _, t in tensors):
            torch.cuda.synchronize()  # the last chunks' copies out of the staging buffers
    return read
