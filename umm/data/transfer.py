"""Host → GPU copies that do not stall the GPU's queue.

A copy from ordinary (pageable) host memory makes CUDA first wait for every kernel queued before
it, so the host cannot run ahead of the GPU and the GPU idles while the host launches the next
kernels (three such copies per training step cost 2.6 ms of a 257 ms step on one H100). A copy
from pinned memory is queued like a kernel; the pinned block is recycled only after the copy has
run (torch's caching host allocator records the stream).
"""
from __future__ import annotations

import torch


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """``t`` on ``device``; a host tensor bound for CUDA goes through pinned memory, asynchronously."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        return (t if t.is_pinned() else t.pin_memory()).to(device, non_blocking=True)
    return t.to(device)
