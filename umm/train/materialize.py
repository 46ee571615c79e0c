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
        """Rows [start, stop) of dim 0 (the whole tensor for a 0-dim one)."""
        meta = self._meta[key]
        dtype, shape = DTYPES_BY_NAME[meta["dtype"]], meta["shape"]
        if not shape:
            start, stop, inner = 0, 1, []
        else:
            inner = shape[1:]
        row_bytes = math.prod(inner) * torch.empty((), dtype=dtype).element_size()
        buf = bytearray((stop - start) * row_bytes)
        if buf:
            self._file.seek(self._base + meta["data_offsets"][0] + start * row_bytes)
            if self._file.readinto(buf) != len(buf):
                raise DamagedFileError(f"{self.path} ended while reading {key}; copy or write it again")
            out = torch.frombuffer(buf, dtype=dtype)
        else:
            out = torch.empty(0, dtype=dtype)
        return out.reshape(shape) if not shape else out.reshape(stop - start, *inner)


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


def read_rows(reader: RowReader, key: str, t: torch.Tensor) -> torch.Tensor:
    """This rank's rows of ``key``, shaped like ``t``'s local part."""
    start, stop = shard_rows(t)
    return reader.rows(key, start, stop).reshape(local(t).shape)


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
            mine = local(t)
            if name in owner:
                i, key = owner[name]
                value = read_rows(handles[i], key, t)
                read[str(files[i].path)] += value.numel() * value.element_size()
            else:
                start, stop = shard_rows(t)
                value = fresh_adapter(name, t.shape, seed)[start:stop].reshape(mine.shape)
            mine.copy_(value)
            del value
    return read
