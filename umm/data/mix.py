"""Weighted mixing of datasets and the per-stream row order.

Every random choice is a pure function of ``(data.seed, names, counters)`` through ``derive_seed``,
so the whole data position is a handful of integers: resuming restores them and reproduces the
same rows in the same order. A *stream* is one (rank, DataLoader worker) pair; stream ``s`` of
``n`` takes rows ``s, s+n, s+2n, ...`` of each epoch's permutation, so streams never share a row.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np

from umm.errors import DataConfigError


def derive_seed(*parts) -> int:
    """A stable 63-bit seed from any printable parts (Python's ``hash`` is salted per process)."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class RowOrder:
    """Row indices of one dataset for one stream: a fresh permutation every epoch, strided by stream.

    With ``blocks`` (row counts of units read together, e.g. parquet row groups, in row order) the
    epoch permutes the blocks, stream ``s`` takes blocks ``s, s+n, ...`` and reads each block's rows
    together (in a permuted order), so a reader holds one block at a time.
    """

    def __init__(self, name: str, num_rows: int, *, seed: int, stream: int, num_streams: int,
                 blocks: Optional[List[int]] = None):
        self.blocks = None if blocks is None else used_blocks(blocks, num_rows)
        units, what = (num_rows, "rows") if self.blocks is None else (len(self.blocks), "row groups")
        if units < num_streams:
            raise DataConfigError(
                f"data.datasets.{name} has {units} {what}, fewer than the {num_streams} data streams "
                "(ranks x data.num_workers): add rows, raise num_used, or use fewer workers"
            )
        self.name, self.num_rows = name, num_rows
        self.seed, self.stream, self.num_streams = seed, stream, num_streams
        self.epoch, self.pos = 0, 0
        # epoch -> the splits it was read under before a resume on another stream count (see resplit)
        self.history: Dict[int, List[Dict]] = {}
        self._rows: Optional[np.ndarray] = None

    def _strided(self, epoch: int, stream: int, num_streams: int) -> np.ndarray:
        rng = np.random.default_rng(derive_seed(self.seed, "order", self.name, epoch))
        if self.blocks is None:
            return rng.permutation(self.num_rows)[stream::num_streams]
        starts = np.concatenate([[0], np.cumsum(self.blocks)])
        mine = rng.permutation(len(self.blocks))[stream::num_streams]
        return np.concatenate([starts[b] + rng.permutation(self.blocks[b]) for b in mine])

    def shares(self, epoch: int, layers: List[Dict], num_streams: int) -> List[np.ndarray]:
        """Every stream's rows of ``epoch`` after the splits ``layers`` (``{"streams": n, "pos": [...]}``:
        n streams had read the first pos[s] rows of their share). Without layers the epoch's permutation
        is strided by stream; after them the rows nobody read are cut into contiguous parts (a blocked
        dataset keeps reading its row groups together)."""
        if not layers:
            return [self._strided(epoch, s, num_streams) for s in range(num_streams)]
        parts = [self._strided(epoch, s, layers[0]["streams"]) for s in range(layers[0]["streams"])]
        for i, layer in enumerate(layers):
            if i:
                parts = np.array_split(left, layer["streams"])
            left = np.concatenate([part[p:] for part, p in zip(parts, layer["pos"])])
        return np.array_split(left, num_streams)

    def _epoch_rows(self) -> np.ndarray:
        if self._rows is None:
            layers = self.history.get(self.epoch, [])
            self._rows = (self.shares(self.epoch, layers, self.num_streams)[self.stream] if layers
                          else self._strided(self.epoch, self.stream, self.num_streams))
        return self._rows

    def next(self) -> Tuple[int, int]:
        """(epoch, row) of the next row for this stream."""
        rows = self._epoch_rows()
        while self.pos >= len(rows):  # a re-split share can be empty
            self.history.pop(self.epoch, None)
            self.epoch, self.pos, self._rows = self.epoch + 1, 0, None
            rows = self._epoch_rows()
        row = int(rows[self.pos])
        self.pos += 1
        return self.epoch, row

    def state_dict(self) -> Dict:
        state = {"epoch": self.epoch, "pos": self.pos}
        if self.history:  # JSON keys are strings
            state["history"] = {str(e): layers for e, layers in self.history.items()}
        return state

    def load_state_dict(self, state: Dict) -> None:
        self.epoch, self.pos, self._rows = int(state["epoch"]), int(state["pos"]), None
        self.history = {int(e): layers for e, layers in state.get("history", {}).items()}

    def resplit(self, states: List[Optional[Dict]], num_streams: int) -> List[Dict]:
        """The states of ``num_streams`` new streams that go on reading where the ``states`` of the old
        streams (one per old stream, None: never read) stopped: within every epoch some old stream is
        in, each row nobody read yet is read by exactly one new stream, and none that was read again."""
        old = [s or {"epoch": 0, "pos": 0} for s in states]
        first = min(int(s["epoch"]) for s in old)
        history = {int(e): layers for e, layers in next(s for s in old if int(s["epoch"]) == first)
                   .get("history", {}).items() if int(e) >= first}
        for epoch in range(first, max(int(s["epoch"]) for s in old) + 1):
            layers = history.get(epoch, [])
            sizes = [len(r) for r in self.shares(epoch, layers, len(old))]
            pos = [sizes[i] if int(s["epoch"]) > epoch else int(s["pos"]) if int(s["epoch"]) == epoch else 0
                   for i, s in enumerate(old)]
            history[epoch] = layers + [{"streams": len(old), "pos": pos}]
        saved = {str(e): layers for e, layers in history.items()}
        return [{"epoch": first, "pos": 0, "history": saved} for _ in range(num_streams)]


def used_blocks(blocks: List[int], num_rows: int) -> List[int]:
    """The blocks of the first ``num_rows`` rows when row ``r`` is row ``r % sum(blocks)`` (``num_used``
    takes the first rows and repeats them): whole blocks in order, cycling, the last one cut short."""
    out, left = [], num_rows
    while left > 0:
        for size in blocks:
            if left <= 0:
                break
            out.append(min(size, left))
            left -= out[-1]
    return out


@dataclass
class MixEntry:
    name: str
    weight: float
    is_mandatory: bool


class WeightedMix:
    """Picks the dataset of the next sample with probability proportional to its weight."""

    def __init__(self, entries: List[MixEntry], *, seed: int, stream: int):
        total = sum(e.weight for e in entries)
        if any(e.weight < 0 for e in entries) or total <= 0:
            raise DataConfigError(
                "data.datasets weights must be >= 0 with a positive sum; got "
                + ", ".join(f"{e.name}={e.weight}" for e in entries)
            )
        self.names = [e.name for e in entries]
        self.cumulative = np.cumsum([e.weight / total for e in entries]).tolist()
        # Close the last interval exactly at 1 (float rounding), on the last entry that can be drawn.
        last = max(i for i, e in enumerate(entries) if e.weight > 0)
        self.cumulative[last:] = [1.0] * (len(entries) - last)
        self.mandatory = [e.name for e in entries if e.is_mandatory]
        self.seed, self.stream = seed, stream
        self.draws = 0

    def choose(self) -> str:
        u = random.Random(derive_seed(self.seed, "mix", self.stream, self.draws)).random()
        self.draws += 1
        for name, edge in zip(self.names, self.cumulative):
            if u < edge:
                return name
        raise AssertionError("unreachable: the last cumulative weight is 1.0")

    def state_dict(self) -> Dict[str, int]:
        return {"draws": self.draws}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.draws = int(state["draws"])
