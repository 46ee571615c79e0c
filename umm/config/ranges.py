"""Numbers a run cannot work with, as a table that ``umm.config.validate`` applies before anything runs
(so ``dry_run=true`` catches them too). Without these, ``train.grad_accum=0`` or ``train.max_steps=0``
trains nothing and reports "completed", and a dropout of 1.5 or an lr of nan fails (or silently
diverges) hours later on every rank.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple


@dataclass(frozen=True)
class Bound:
    """A finite number in [low, high]; ``low_open`` excludes ``low`` itself (``lr > 0``)."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False

    def problem(self, value) -> Optional[str]:
        """Why ``value`` is out of range (``must be > 0``), or None."""
        if not math.isfinite(value):
            return f"must be a finite number {self.describe()}"
        inside = (value > self.low if self.low_open else value >= self.low) and value <= self.high
        return None if inside else f"must be {self.describe()}"

    def describe(self) -> str:
        if self.high == math.inf:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}]"


POSITIVE = Bound(0, low_open=True)
AT_LEAST_1 = Bound(1)
NON_NEGATIVE = Bound(0)
PROBABILITY = Bound(0, 1)

# Key path (``*`` = any key of a free-form map) -> its bound.
BOUNDS: Dict[str, Bound] = {
    "train.max_steps": AT_LEAST_1,
    "train.grad_accum": AT_LEAST_1,
    "train.export_every": NON_NEGATIVE,  # 0: full weight files only at the end
    "train.profile_at": AT_LEAST_1,  # or null: no profile
    "train.profile_steps": AT_LEAST_1,
    "train.ema_decay": PROBABILITY,  # or null: no EMA
    "method.text_cond_dropout_prob": PROBABILITY,
    "method.vit_cond_dropout_prob": PROBABILITY,
    "method.vae_cond_dropout_prob": PROBABILITY,
    "method.think_drop": PROBABILITY,
    "method.lora.dropout": PROBABILITY,
    "optim.lr": POSITIVE,
    "optim.min_lr": NON_NEGATIVE,
    "optim.weight_decay": NON_NEGATIVE,
    "optim.warmup_steps": NON_NEGATIVE,
    # A weight of 0 would keep a dataset in the mix that is never drawn (and a mandatory one never fits).
    "data.datasets.*.weight": POSITIVE,
    "data.expected_num_tokens": AT_LEAST_1,
    "data.max_num_tokens_per_sample": AT_LEAST_1,
    "data.max_skip_fraction": PROBABILITY,
    "data.max_resize_factor": AT_LEAST_1,  # how far a small image may be upscaled
    "data.max_image_pixels": AT_LEAST_1,
}

# (smaller, larger): the first key's value may not exceed the second's. A batch holds at most
# data.max_num_tokens tokens, so a sample up to max_num_tokens_per_sample long must fit in one.
AT_MOST: Tuple[Tuple[str, str], ...] = (
    ("data.max_num_tokens_per_sample", "data.max_num_tokens"),
    ("data.expected_num_tokens", "data.max_num_tokens"),
)
