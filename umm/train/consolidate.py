"""A full run's consolidated checkpoint files: ``model.safetensors`` and ``ema.safetensors`` in
upstream's layout (what BAGEL's own code loads), written one tensor at a time.

Every rank joins each tensor's gather (FSDP2 shards frozen and trained parameters alike) and rank 0
streams it to the file at once and lets it go, so no process holds the whole model. Gathered whole
first, as before, the fp32 weights and EMA of BAGEL-7B-MoT's SFT alone are about 117 GB on rank 0's host.
The order of the tensors is the file's (widest dtype first), the same on every rank.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

from umm import faults
from umm.train import distributed as D
from umm.train.checkpoint import fsync_file
from umm.train.distributed import DistEnv
from umm.train.state_dict import is_adapter_key, upstream_key
from umm.train.stream_safetensors import StreamWriter, widest_first

Gather = Callable[[], torch.Tensor]  # a collective: every rank calls it, in the same order


def _write(path: Path, sources: Dict[str, Tuple[torch.Tensor, Gather]], env: DistEnv,
           error: Optional[Exception] = None) -> Optional[Exception]:
    """``sources``: upstream key -> (a tensor with the global dtype and shape, its gather). Every rank
    joins every gather whatever happens on rank 0, whose first write error (or ``error``, an earlier
    file's) is returned, to be raised once all files' gathers are done."""
    order = widest_first({key: like.dtype for key, (like, _) in sources.items()})
    layout = {key: (sources[key][0].dtype, tuple(sources[key][0].shape)) for key in order}
    writer = None
    if env.is_main and error is None:
        try:
            writer = StreamWriter(path, layout)
        except Exception as e:  # rank 0 stays in the gathers below whatever it was
            error = e
    try:
        for key in order:
            value = sources[key][1]()
            if writer is not None and error is None:
                try:
                    faults.fire("consolidate")
                    writer.write(key, value.detach())
                except Exception as e:
                    error = e
            del value
    except BaseException as e:  # a gather that failed: close the file and pass the error on
        if writer is not None:
            writer.__exit__(type(e), e, e.__traceback__)
        raise
    if writer is not None:
        try:  # checked complete and synced to disk only when nothing failed (a full disk can show here)
            writer.__exit__(*((type(error), error, None) if error is not None else (None, None, None)))
            if error is None:
                fsync_file(path)
        except Exception as e:
            error = error or e
    return error


@torch.no_grad()
def write_consolidated(out: Path, model: torch.nn.Module, masters: List[Tuple[str, torch.Tensor]],
                       ema_shards: Optional[List[Tuple[str, torch.Tensor, torch.Tensor]]], env: DistEnv) -> None:
    """``model.safetensors`` (the fp32 ``masters`` where the run keeps them apart from its compute weights)
    and, given the EMA's ``(name, parameter, this rank's EMA)``, ``ema.safetensors`` (the EMA of the
    trained tensors, the frozen ones as they are) into ``out``. Every rank calls it; a write error on
    rank 0 is raised there after the last gather (the commit then stops every rank with it)."""
    # Parameters and buffers by their state-dict names, tensors still sharded (a DTensor's dtype and
    # shape are the global ones).
    state = {name: t for name, t in model.state_dict().items() if not is_adapter_key(name)}
    unknown = [name for name, _ in masters if name not in state]
    if unknown:
        raise ValueError(f"fp32 masters of no state-dict tensor, e.g. {unknown[:3]}")
    raw = {**state, **dict(masters)}
    model_sources = {upstream_key(name): (t, lambda t=t: D.full(t)) for name, t in raw.items()}
    error = _write(Path(out) / "model.safetensors", model_sources, env)
    if ema_shards is not None:
        ema_sources = dict(model_sources)
        for name, p, shadow in ema_shards:
            like = torch.empty(p.shape, dtype=torch.float32, device="meta")
            ema_sources[upstream_key(name)] = (like, lambda s=shadow, p=p: D.full_like(s, p).float())
        error = _write(Path(out) / "ema.safetensors", ema_sources, env, error)
    if error is not None:
        raise error
