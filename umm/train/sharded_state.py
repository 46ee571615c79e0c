"""Resume state as per-rank shards: each rank writes the rows it holds, any world size reads them back.

``state/shards.rankNNNNN.safetensors`` holds this rank's piece of every saved tensor under
``<group>/<name>`` (FSDP2 shards dim 0; a tensor every rank holds whole comes from rank 0 only). Its
header's ``umm_shards`` metadata (JSON) gives each key's global shape and the rows [start, stop) the
file holds. :class:`ShardReader` reads the headers of all rank files and serves any row range of any
tensor from whichever files hold it, so a run on another number of processes re-shards on load.
Nothing here runs code from a file: tensors come from safetensors, the index from JSON.
Per-rank extras that are not pieces of a global tensor (RNG states) sit in the same file under
``rank/`` keys, outside the index.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from safetensors import SafetensorError, safe_open

from umm.train.checkpoint import CheckpointError, write_safetensors
from umm.train.distributed import local

INDEX_KEY = "umm_shards"
RANK_KEY = "umm_rank"


def shard_file(rank: int) -> str:
    return f"shards.rank{rank:05d}.safetensors"


def shard_rows(t: torch.Tensor) -> Tuple[int, int]:
    """The rows [start, stop) of dim 0 this rank holds (all of them for a plain tensor; 0-dim: (0, 1))."""
    if t.dim() == 0:
        return 0, 1
    if not hasattr(t, "device_mesh"):
        return 0, t.shape[0]
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if any(isinstance(p, Shard) and p.dim != 0 for p in t.placements):
        raise ValueError(f"only dim-0 sharding is supported, got {t.placements}")
    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return offset[0], offset[0] + shape[0]


class ShardWriter:
    """Collects one rank's pieces, then writes them as one safetensors file."""

    def __init__(self, rank: int):
        self.rank = rank
        self.tensors: Dict[str, torch.Tensor] = {}
        self.index: Dict[str, dict] = {}
        self.rank_meta: dict = {}

    def add(self, key: str, value: torch.Tensor, like: Optional[torch.Tensor] = None) -> None:
        """``value``: this rank's piece of a tensor sharded like ``like`` (default: ``value`` itself, a
        DTensor or a tensor every rank holds whole)."""
        like = value if like is None else like
        if not hasattr(like, "device_mesh") and self.rank != 0:
            return  # the same on every rank: rank 0 writes it
        start, stop = shard_rows(like)
        if stop > start:  # FSDP2 can leave a rank no rows of a small tensor
            self.tensors[key] = local(value).detach().to("cpu").contiguous()
            self.index[key] = {"shape": list(like.shape), "rows": [start, stop]}

    def add_rank(self, key: str, value: torch.Tensor) -> None:
        """A tensor of this rank alone (not part of a global tensor)."""
        self.tensors[f"rank/{key}"] = value.detach().to("cpu").contiguous()

    def write(self, state_dir: Path) -> None:
        write_safetensors(self.tensors, Path(state_dir) / shard_file(self.rank),
                          metadata={INDEX_KEY: json.dumps(self.index), RANK_KEY: json.dumps(self.rank_meta)})


class ShardReader:
    """Any rows of the tensors the ranks of a checkpoint wrote (the same ``keys``/``shape``/``rows`` as
    a single file's reader)."""

    def __init__(self, state_dir: Path, world_size: int):
        self.state_dir = Path(state_dir)
        self.files: List = []
        self.rank_meta: List[dict] = []
        self.shapes: Dict[str, Tuple[int, ...]] = {}
        self.pieces: Dict[str, List[Tuple[int, int, int]]] = {}  # key -> [(start, stop, file)]
        try:
            for rank in range(world_size):
                path = self.state_dir / shard_file(rank)
                f = safe_open(str(path), framework="pt")
                self.files.append(f)
                meta = f.metadata() or {}
                index = json.loads(meta.get(INDEX_KEY, "null"))
                if not isinstance(index, dict):
                    raise ValueError(f"{path} has no shard index")
                self.rank_meta.append(json.loads(meta.get(RANK_KEY, "{}")))
                for key, entry in index.items():
                    shape, (start, stop) = tuple(int(d) for d in entry["shape"]), entry["rows"]
                    held = tuple(f.get_slice(key).get_shape())
                    if held != ((*(() if not shape else (stop - start,)), *shape[1:])):
                        raise ValueError(f"{path} holds {key} as {held}, its index says rows {start}:{stop} of {shape}")
                    if self.shapes.setdefault(key, shape) != shape:
                        raise ValueError(f"{path} gives {key} the shape {shape}, another rank {self.shapes[key]}")
                    self.pieces.setdefault(key, []).append((int(start), int(stop), rank))
        except (OSError, SafetensorError, ValueError, TypeError, KeyError) as e:
            raise CheckpointError(f"cannot read the sharded state in {self.state_dir}: {e}") from None
        for key in self.pieces:
            self.pieces[key].sort()
            rows = self.shapes[key][0] if self.shapes[key] else 1
            self._cover(key, 0, rows)  # every row of every tensor is in some file

    def keys(self) -> List[str]:
        return list(self.shapes)

    def shape(self, key: str) -> Tuple[int, ...]:
        return self.shapes[key]

    def _cover(self, key: str, start: int, stop: int) -> List[Tuple[int, int, int, int]]:
        """[(file, piece start, from, to)] reading rows [start, stop) of ``key``."""
        out, at = [], start
        for s, e, f in self.pieces[key]:
            if at >= stop:
                break
            if s <= at < e:
                out.append((f, s, at, min(e, stop)))
                at = min(e, stop)
        if at < stop:
            raise CheckpointError(f"cannot resume: no file in {self.state_dir} holds rows {at}.. of {key} "
                                  f"(a rank's shard file is missing or cut)")
        return out

    def rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of dim 0 (the tensor itself for a 0-dim one)."""
        parts = []
        for f, s, a, b in self._cover(key, start, stop):
            if not self.shapes[key]:
                return self.files[f].get_tensor(key)
            parts.append(self.files[f].get_slice(key)[a - s:b - s])
        if not parts:
            return torch.empty((0, *self.shapes[key][1:]))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def full(self, key: str) -> torch.Tensor:
        return self.rows(key, 0, self.shapes[key][0] if self.shapes[key] else 1)

    def like(self, key: str, t: torch.Tensor) -> torch.Tensor:
        """This rank's piece of ``key`` for a tensor sharded like ``t`` (the global shapes must agree)."""
        if self.shapes[key] != tuple(t.shape):
            raise CheckpointError(f"cannot resume: {key} was saved with shape {self.shapes[key]}, this run's "
                                  f"is {tuple(t.shape)} (a checkpoint of another model or method)")
        return self.rows(key, *shard_rows(t)).reshape(local(t).shape)

    def rank_tensors(self, rank: int) -> Dict[str, torch.Tensor]:
        f = self.files[rank]
        return {k[len("rank/"):]: f.get_tensor(k) for k in f.keys() if k.startswith("rank/")}
