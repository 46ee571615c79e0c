"""Token-budget batching: fill one packed sequence to ``expected_num_tokens`` (reference/bagel.md §5.8).

Rules as upstream: a batch starts with one sample of every mandatory dataset; while the batch holds
fewer than ``prefer_buffer_before`` tokens it takes samples from the overflow buffer first; a sample
that would push the batch past ``max_num_tokens`` goes to the buffer (up to ``max_buffer_size``);
the batch is done once it reaches ``expected_num_tokens``. One change: when the buffer is full,
upstream yields the batch and *drops* the sample that did not fit; here it is kept at the front of
the buffer for the next batch, so no row is lost.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Tuple

from umm.data.plan import ImageItem, SamplePlan, TextItem

# (dataset name, epoch, row): enough to rebuild the sample exactly (its randomness derives from it).
SampleKey = Tuple[str, int, int]


@dataclass
class Sample:
    key: SampleKey
    plan: SamplePlan
    num_tokens: int


def plan_num_tokens(plan: SamplePlan, *, vae_stride: int, vit_stride: int) -> int:
    """Tokens the packed sample occupies: text gets <|im_start|>/<|im_end|>, images their two markers;
    items already cfg-dropped (``cfg_dropped``) take none."""
    total = 0
    for item in plan.items:
        if item.enable_cfg and item.cfg_dropped:
            continue
        if isinstance(item, TextItem):
            total += len(item.ids) + 2
        elif isinstance(item, ImageItem):
            stride = vit_stride if item.role == "vit" else vae_stride
            total += (item.image.shape[-2] // stride) * (item.image.shape[-1] // stride) + 2
        else:
            raise TypeError(f"unknown plan item {type(item).__name__} in {plan.source}")
    return total


class TokenBudget:
    def __init__(self, *, expected_num_tokens: int, max_num_tokens: int, max_num_tokens_per_sample: int,
                 prefer_buffer_before: int, max_buffer_size: int):
        if not 0 < expected_num_tokens <= max_num_tokens:
            raise ValueError(
                f"need 0 < data.expected_num_tokens <= data.max_num_tokens; got {expected_num_tokens}, "
                f"{max_num_tokens}"
            )
        if not 0 < max_num_tokens_per_sample <= max_num_tokens:
            raise ValueError(
                f"need 0 < data.max_num_tokens_per_sample <= data.max_num_tokens; got "
                f"{max_num_tokens_per_sample}, {max_num_tokens}"
            )
        self.expected = expected_num_tokens
        self.max_tokens = max_num_tokens
        self.prefer_buffer_before = prefer_buffer_before
        self.max_buffer_size = max_buffer_size
        self.buffer: List[Sample] = []

    def fill(self, draw: Callable[[], Sample], mandatory: Callable[[], List[Sample]]) -> List[Sample]:
        """One batch. ``draw`` gives the next mixed sample; ``mandatory`` one per mandatory dataset."""
        batch = list(mandatory())
        tokens = sum(s.num_tokens for s in batch)
        while tokens < self.expected:
            from_buffer = bool(self.buffer) and tokens < self.prefer_buffer_before
            sample = self.buffer.pop(0) if from_buffer else draw()
            if tokens + sample.num_tokens > self.max_tokens:
                if not from_buffer and len(self.buffer) < self.max_buffer_size:
                    self.buffer.append(sample)
                    continue
                # Kept for the next batch (which it fits: samples are within max_num_tokens_per_sample).
                self.buffer.insert(0, sample)
                break
            batch.append(sample)
            tokens += sample.num_tokens
        return batch
