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


def derive_seed(*parts) -> int:
    """A stable 63-bit seed from any printable parts (Python's ``hash`` is salted per process)."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class RowOrder:
    """Row indices of one dataset for one stream: a fresh permutation every epoch, strided by stream."""

    def __init__(self, name: str, num_rows: int, *, seed: int, stream: int, num_streams: int):
        if num_rows < num_streams:
            raise ValueError(
                f"dataset {name!r} has {num_rows} rows, fewer than the {num_streams} data streams "
                "(ranks x data.num_workers): add rows, raise num_used, or use fewer workers"
            )
        self.name, self.num_rows = name, num_rows
        self.seed, self.stream, self.num_streams = seed, stream, num_streams
        self.epoch, self.pos = 0, 0
        self._rows: Optional[np.ndarray] = None

    def _epoch_rows(self) -> np.ndarray:
        if self._rows is None:
            perm = np.random.default_rng(derive_seed(self.seed, "order", self.name, self.epoch)).permutation(
                self.num_rows
            )
            self._rows = perm[self.stream :: self.num_streams]
        return self._rows

    def next(self) -> Tuple[int, int]:
        """(epoch, row) of the next row for this stream."""
        rows = self._epoch_rows()
        if self.pos >= len(rows):
            self.epoch, self.pos, self._rows = self.epoch + 1, 0, None
            rows = self._epoch_rows()
        row = int(rows[self.pos])
        self.pos += 1
        return self.epoch, row

    def state_dict(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.epoch, self.pos, self._rows = int(state["epoch"]), int(state["pos"]), None


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
            raise ValueError(
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
