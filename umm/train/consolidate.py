"""A full run's consolidated checkpoint files: ``model.safetensors`` and ``ema.safetensors`` in
upstream's layout (what BAGEL's own code loads), written one tensor at a time.

Every rank joins each tensor's gather (FSDP2 shards frozen and trained parameters alike) and rank 0
streams it to the file at once and lets it go, so no process holds the whole model. Gathered whole
first, BAGEL-7B-MoT's fp32 weights, EMA and frozen parts came to about 120 GB on rank 0's host.
The order of the tensors is the file's (widest dtype first), the same on every rank.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

from umm.train import distributed as D
from umm.train.distributed import DistEnv
from umm.train.state_dict import is_adapter_key, upstream_key
from umm.train.stream_safetensors import StreamWriter, widest_first

Gather = Callable[[], torch.Tensor]  # a collective: every rank calls it, in the same order


def _write(path: Path, sources: Dict[str, Tuple[torch.Tensor, Gather]], env: DistEnv) -> None:
    """``sources``: upstream key -> (a tensor with the global dtype and shape, its gather)."""
    order = widest_first({key: like.dtype for key, (like, _) in sources.items()})
    layout = {key: (sources[key][0].dtype, tuple(sources[key][0].shape)) for key in order}
    writer, error = None, None
    with contextlib.ExitStack() as stack:
        if env.is_main:
            try:
                writer = stack.enter_context(StreamWriter(path, layout))
            except OSError as e:
                error = e
        for key in order:
            value = sources[key][1]()  # after a failed write too: the other ranks are in this gather
            if writer is not None and error is None:
                try:
                    writer.write(key, value.detach())
                except OSError as e:  # reported on every rank at the commit
                    error = e
            del value
        if error is not None:
            raise error


def write_consolidated(out: Path, model: torch.nn.Module, masters: List[Tuple[str, torch.Tensor]],
                       ema_shards: Optional[List[Tuple[str, torch.Tensor, torch.Tensor]]], env: DistEnv) -> None:
    """``model.safetensors`` (the fp32 ``masters`` where the run keeps them apart from its compute weights)
    and, given the EMA's ``(name, parameter, this rank's EMA)``, ``ema.safetensors`` (the EMA of the
    trained tensors, the frozen ones as they are) into ``out``. Every rank calls it."""
    # Parameters and buffers by their state-dict names, tensors still sharded (a DTensor's dtype and
    # shape are the global ones).
    state = {name: t for name, t in model.state_dict().items() if not is_adapter_key(name)}
    raw = dict(state, **{name: w for name, w in masters if name in state})
    model_sources = {upstream_key(name): (t, lambda t=t: D.full(t)) for name, t in raw.items()}
    _write(Path(out) / "model.safetensors", model_sources, env)
    if ema_shards is None:
        return
    ema_sources = dict(model_sources)
    for name, p, shadow in ema_shards:
        like = torch.empty(p.shape, dtype=torch.float32, device="meta")
        ema_sources[upstream_key(name)] = (like, lambda s=shadow, p=p: D.full_like(s, p).float())
    _write(Path(out) / "ema.safetensors", ema_sources, env)
