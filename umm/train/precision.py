"""Compute precision: ``train.precision`` bf16 runs matmuls in bf16 over fp32 master weights."""
from __future__ import annotations

from contextlib import nullcontext

import torch

PRECISIONS = ("bf16", "fp32")


def autocast(device: torch.device, precision: str):
    """The autocast context of one forward (training step, AE encode, sampling)."""
    if precision not in PRECISIONS:
        raise ValueError(f"train.precision={precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()
