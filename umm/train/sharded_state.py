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

import contextlib
import json
import math
import os
import threading
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from umm.train.checkpoint import CheckpointError, read_meta, write_safetensors
from umm.train.distributed import local, start_thread
from umm.train.materialize import RowReader, shard_rows
from umm.train.stream_safetensors import widest_first

INDEX_KEY = "umm_shards"
RANK_KEY = "umm_rank"
FORMAT = "umm-shards-1"  # state/meta.json's "format" for checkpoints with this state


def shard_file(rank: int) -> str:
    return f"shards.rank{rank:05d}.safetensors"


def copy_specs(tensors) -> Dict[str, Tuple[torch.Size, torch.dtype]]:
    """(name, tensor) pairs as :meth:`HostCopies.views`' specs."""
    return {name: (t.shape, t.dtype) for name, t in tensors}


class HostCopies:
    """Host copies of tensors that training cannot change while a background thread writes them
    (train.async_save): a rank's shard, LoRA's gathered adapters. One buffer holds them all, laid out
    once (by :meth:`prepare` beside training, or by the first save) and reused by every later save (the
    next copy waits for the previous write): exactly one host copy, where torch's caching host
    allocator rounds each tensor up to a power of two. Under
    CUDA the buffer is page-locked (cudaHostRegister), so the copies run at bus speed. Measured on an
    H100 for UniCoT's 19 GiB shard (scripts/bench_save_staging.py): 1.7 s to touch and lock it once
    (4.8 s untouched), then 0.4 s a save; pageable copies took 11.9-16.2 s every save, a pinned tensor
    each 10.2-18.7 s the first time and 1.5x the memory."""

    def __init__(self, pin: bool):
        self.pinned = pin  # page-locked (the run trains on CUDA)
        self.flat: Optional[torch.Tensor] = None
        self.layout: Dict[str, Tuple[int, torch.Size, torch.dtype]] = {}
        self._views: Dict[str, torch.Tensor] = {}
        self._preparing: Optional[threading.Thread] = None

    def prepare(self, specs: Dict[str, Tuple[torch.Size, torch.dtype]]) -> None:
        """Lay the buffer out for ``specs`` in a thread while training goes on, so that the first save
        with them only copies (touching and locking 19 GiB took 1.7 s on an H100). Only before the
        first save: a new layout frees the buffer a writer may still be reading. A failure here leaves
        no buffer, and the save lays it out again and meets the error there."""
        self._join_prepare()

        def lay_out() -> None:
            try:
                self._lay_out(specs)
            except Exception:  # noqa: BLE001 - met again by the save (above)
                self.release()

        self._preparing = start_thread(lay_out, name="umm-host-copies")

    def _join_prepare(self) -> None:
        if self._preparing is not None:
            self._preparing.join()
            self._preparing = None

    def views(self, specs: Dict[str, Tuple[torch.Size, torch.dtype]]) -> Dict[str, torch.Tensor]:
        """The buffer's views for tensors of these shapes and dtypes, laid out anew only when they
        change; valid until the next call. Fill them with :meth:`copy`, then :meth:`wait`.

        The views lie back to back in the order returned (:func:`widest_first`, the order the file
        writer uses): the data section of a safetensors file of them, so :attr:`flat` goes to disk in
        one write."""
        self._join_prepare()
        return self._lay_out(specs)

    def _lay_out(self, specs: Dict[str, Tuple[torch.Size, torch.dtype]]) -> Dict[str, torch.Tensor]:
        layout, offset = {}, 0
        for key in widest_first({key: dtype for key, (_, dtype) in specs.items()}):
            shape, dtype = specs[key]
            layout[key] = (offset, torch.Size(shape), dtype)
            offset += math.prod(shape) * dtype.itemsize
        if layout != self.layout:
            self._allocate(layout, offset)
        return self._views

    @staticmethod
    def copy(view: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return view.copy_(t.detach(), non_blocking=t.is_cuda)

    def wait(self) -> None:
        """Until every copy has landed (they are queued without waiting)."""
        if self.pinned:
            torch.cuda.synchronize()

    def stage(self, tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """``tensors`` copied into the buffer (waited for), in the buffer's order."""
        views = self.views(copy_specs(tensors.items()))
        for key, view in views.items():
            self.copy(view, tensors[key])
        self.wait()
        return dict(views)

    def _allocate(self, layout: Dict[str, Tuple[int, torch.Size, torch.dtype]], size: int) -> None:
        self.release()
        flat = torch.empty(size, dtype=torch.uint8)
        if self.pinned and size:
            # Touched first: the fill faults the pages in on every core, where cudaHostRegister faults
            # them on one. On an H100 host, 19.25 GiB: 0.9 s + 0.8 s to lock, against 4.8 s fresh (in
            # huge pages the touch took 4.2 s; scripts/bench_save_staging.py --register). One fill at a
            # time: two threads' _threads would restore each other's thread counts wrongly.
            with _FILL, _threads((os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))):
                flat.fill_(0)
            rc = int(torch.cuda.cudart().cudaHostRegister(flat.data_ptr(), size, 0))
            if rc:
                raise CheckpointError(f"page-locking {size / 2**30:.1f} GiB of host memory for train.async_save "
                                      f"failed (cudaError {rc}); set train.async_save=false")
        self.flat, self.layout = flat, layout
        self._views = {key: flat[off:off + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
                      for key, (off, shape, dtype) in layout.items()}

    def release(self) -> None:
        if self._preparing is not None and self._preparing is not threading.current_thread():
            self._join_prepare()
        if self.flat is not None and self.pinned and self.flat.numel():
            torch.cuda.cudart().cudaHostUnregister(self.flat.data_ptr())
        self.flat, self.layout, self._views = None, {}, {}


_FILL = threading.Lock()


@contextlib.contextmanager
def _threads(n: int):
    """At least ``n`` intra-op threads meanwhile (torchrun runs its ranks with one)."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(before, n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


class ShardWriter:
    """Collects one rank's pieces, then writes them as one safetensors file."""

    def __init__(self, rank: int, copies: Optional[HostCopies] = None):
        self.rank = rank
        self.copies = copies
        self.tensors: Dict[str, torch.Tensor] = {}
        self.index: Dict[str, dict] = {}
        self.rank_meta: dict = {}
        self._data: Optional[torch.Tensor] = None  # the staged bytes, once to_host copied them

    def add(self, key: str, value: torch.Tensor, like: Optional[torch.Tensor] = None) -> None:
        """``value``: this rank's piece of a tensor sharded like ``like`` (default: ``value`` itself, a
        DTensor or a tensor every rank holds whole)."""
        like = value if like is None else like
        if not hasattr(like, "device_mesh") and self.rank != 0:
            return  # the same on every rank: rank 0 writes it
        start, stop = shard_rows(like) if like.dim() else (0, 1)
        if stop > start:  # FSDP2 can leave a rank no rows of a small tensor
            self.tensors[key] = local(value).detach()
            self.index[key] = {"shape": list(like.shape), "rows": [start, stop]}

    def add_rank(self, key: str, value: torch.Tensor) -> None:
        """A tensor of this rank alone (not part of a global tensor)."""
        self.tensors[f"rank/{key}"] = value.detach()

    def to_host(self) -> None:
        """With ``copies``: the pieces copied into them (a thread may then write them while training
        goes on). Without, they stay where they live and :meth:`write` streams them from there (a
        synchronous save: no host copy of the shard)."""
        if self.copies is not None:
            self.tensors = self.copies.stage(self.tensors)
            self._data = self.copies.flat

    def write(self, state_dir: Path) -> None:
        # Staged: the buffer is the file's data section, one write (a writer thread that wrote tensor
        # by tensor would wait for the GIL at each one while training holds it).
        write_safetensors(self.tensors, Path(state_dir) / shard_file(self.rank),
                          metadata={INDEX_KEY: json.dumps(self.index), RANK_KEY: json.dumps(self.rank_meta)},
                          data=self._data)


class ShardReader:
    """Any rows of the tensors the ranks of a checkpoint wrote, with the ``keys``/``shape``/``rows`` of
    a single file's :class:`RowReader` (so ``materialize`` reads a resume like a model dir)."""

    def __init__(self, state_dir: Path, world_size: int):
        self.state_dir = Path(state_dir)
        self.files: List[RowReader] = []
        self.rank_meta: List[dict] = []
        self.shapes: Dict[str, Tuple[int, ...]] = {}
        self.pieces: Dict[str, List[Tuple[int, int, int]]] = {}  # key -> [(start, stop, file)]
        try:
            for rank in range(world_size):
                path = self.state_dir / shard_file(rank)
                f = RowReader(path)
                self.files.append(f)
                index = json.loads(f.metadata.get(INDEX_KEY, "null"))
                if not isinstance(index, dict):
                    raise ValueError(f"{path} has no shard index")
                self.rank_meta.append(json.loads(f.metadata.get(RANK_KEY, "{}")))
                for key, entry in index.items():
                    shape, (start, stop) = tuple(int(d) for d in entry["shape"]), entry["rows"]
                    if f.shape(key) != ((*(() if not shape else (stop - start,)), *shape[1:])):
                        raise ValueError(f"{path} holds {key} as {f.shape(key)}, its index says rows "
                                         f"{start}:{stop} of {shape}")
                    if self.shapes.setdefault(key, shape) != shape:
                        raise ValueError(f"{path} gives {key} the shape {shape}, another rank {self.shapes[key]}")
                    self.pieces.setdefault(key, []).append((int(start), int(stop), rank))
        except (OSError, ValueError, TypeError, KeyError) as e:
            self.close()
            raise CheckpointError(f"cannot read the sharded state in {self.state_dir}: {e}") from None
        for key in self.pieces:
            self.pieces[key].sort()
            self._cover(key, 0, self._rows(key))  # every row of every tensor is in some file

    def __enter__(self) -> "ShardReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for f in self.files:
            f.__exit__()

    def keys(self) -> List[str]:
        return list(self.shapes)

    def shape(self, key: str) -> Tuple[int, ...]:
        return self.shapes[key]

    def dtype(self, key: str) -> torch.dtype:
        return self.files[self.pieces[key][0][2]].dtype(key)

    def _rows(self, key: str) -> int:
        return self.shapes[key][0] if self.shapes[key] else 1

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
        """Rows [start, stop) of dim 0 (the tensor itself for a 0-dim one), in host memory."""
        shape = self.shapes[key]
        out = torch.empty((stop - start, *shape[1:]) if shape else (), dtype=self.dtype(key))
        self.read_into(key, start, stop, out)
        return out

    def read_into(self, key: str, start: int, stop: int, out: torch.Tensor) -> int:
        """:meth:`RowReader.read_into`, from whichever files hold the rows."""
        if not self.shapes[key]:
            return self.files[self.pieces[key][0][2]].read_into(key, 0, 1, out)
        by_row = out.view(stop - start, math.prod(self.shapes[key][1:]))
        return sum(self.files[f].read_into(key, a - s, b - s, by_row[a - start:b - start])
                   for f, s, a, b in self._cover(key, start, stop))

    def full(self, key: str) -> torch.Tensor:
        return self.rows(key, 0, self._rows(key))

    def like(self, key: str, t: torch.Tensor) -> torch.Tensor:
        """This rank's piece of ``key`` for a tensor sharded like ``t`` (the global shapes must agree), read
        onto ``t``'s device: a resume holds no host copy of its optimizer state (9.3 GB of moments for
        LoRA at 7B; freed, host tensors that size can stay in the process's resident memory)."""
        mine = local(t)
        out = torch.empty(mine.shape, dtype=self.dtype(key), device=mine.device)
        self._read_like(key, t, out)
        return out

    def fill(self, key: str, t: torch.Tensor, out: torch.Tensor) -> bool:
        """:meth:`like` straight into ``out`` (its dtype and device: a host-resident EMA is read into
        host memory, not through the GPU); False when the checkpoint has no ``key``."""
        if key not in self.shapes:
            return False
        self._read_like(key, t, out)
        return True

    def _read_like(self, key: str, t: torch.Tensor, out: torch.Tensor) -> None:
        if self.shapes[key] != tuple(t.shape):
            raise CheckpointError(f"cannot resume: {key} was saved with shape {self.shapes[key]}, this run's "
                                  f"is {tuple(t.shape)} (a checkpoint of another model or method)")
        self.read_into(key, *shard_rows(t), out)

    def rank_tensors(self, rank: int) -> Dict[str, torch.Tensor]:
        """The ``add_rank`` tensors of ``rank``."""
        f = self.files[rank]
        return {k[len("rank/"):]: f.rows(k, 0, f.shape(k)[0] if f.shape(k) else 1)
                for k in f.keys() if k.startswith("rank/")}


def open_checkpoint(ckpt: Path) -> ShardReader:
    """The sharded state of a complete checkpoint, whatever world size wrote it."""
    meta = read_meta(ckpt)
    if meta.get("format") != FORMAT or not isinstance(meta.get("world_size"), int):
        raise CheckpointError(
            f"cannot resume {ckpt}: it has no sharded state ({Path(ckpt) / 'state' / 'meta.json'} names no "
            f"format {FORMAT!r}; written by an older umm?); start from its weights only with "
            f"method.init_from={ckpt} train.resume=false"
        )
    return ShardReader(Path(ckpt) / "state", meta["world_size"])
