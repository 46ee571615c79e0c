"""Which blocks recompute their forward in the backward (activation checkpointing), as a fraction.

``train.activation_checkpointing`` is true or full (every block), false or none, every2 (every other
LLM block), a fraction between 0 and 1 (that share of the LLM's blocks, spread evenly), or auto (the
fewest the memory plan fits into the GPU: umm/train/memory_plan.py). The ViT's blocks all recompute
once any LLM block does (umm/train/parallel.py). Plain Python: dry runs plan without torch.
"""
from __future__ import annotations

import math
from typing import Any, List

NAMED = {"none": 0.0, "full": 1.0, "every2": 0.5}  # scripts/bench_train.py's --ac names


def fraction(setting: Any) -> float:
    """The share of blocks recomputed for a setting other than auto: true 1, false 0, a name of
    :data:`NAMED`, or the number itself."""
    if setting is True or setting is False:
        return float(setting)
    if isinstance(setting, str) and setting in NAMED:
        return NAMED[setting]
    if isinstance(setting, (int, float)) and 0 <= setting <= 1:
        return float(setting)
    raise ValueError(f"activation checkpointing {setting!r} is not true, false, full, none, every2 or a fraction in [0, 1]")


def recomputed(num_blocks: int, share: float) -> List[int]:
    """Indices of the blocks that recompute, ``ceil(num_blocks * share)`` of them, evenly spread from
    the first (0.5: every even block)."""
    def upto(i: int) -> int:  # blocks recomputed among the first i (rounded first: 19/28 * 28 is 19)
        return math.ceil(round(i * share, 9))

    return [i for i in range(num_blocks) if upto(i + 1) > upto(i)]
