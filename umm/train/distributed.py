"""Process group, device and the few collectives the trainer needs.

One process (no torch.distributed at all) or torchrun (env RANK / WORLD_SIZE / LOCAL_RANK), on
NCCL for CUDA and on gloo for CPU (FSDP2 works on gloo, so the CPU test runs exercise the same
code path as the GPUs). Sharding itself (FSDP2 per block plus the root, fp32 master weights, bf16
compute) lives in umm/train/parallel.py.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist

from umm.errors import UmmError


class DeviceError(UmmError, RuntimeError):
    """The requested device or process layout does not exist on this machine."""


def start_thread(target: Callable[..., None], *args, name: Optional[str] = None) -> threading.Thread:
    """A daemon thread on the caller's CUDA device. A new thread starts on device 0, where its first CUDA
    call would create a context (about 0.5 GiB on an H100) for every other rank of the node."""
    device = torch.cuda.current_device() if torch.cuda.is_initialized() else None

    def run() -> None:
        if device is not None:
            torch.cuda.set_device(device)
        target(*args)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(name: str, local_rank: int) -> torch.device:
    """``auto`` → cuda if available else cpu; on CUDA each local rank gets its own card."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name != "cuda":
        raise DeviceError(f"train.device={name!r} is not one of auto, cpu, cuda")
    # Every rank checks the whole node, so all fail at once instead of some waiting for the others.
    check_gpus(name, int(os.environ.get("LOCAL_WORLD_SIZE", local_rank + 1)))
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def check_gpus(device_name: str, nproc_per_node: int, visible: Optional[int] = None) -> None:
    """On CUDA each of a node's ``nproc_per_node`` processes needs a GPU of its own (``visible``:
    the GPU count, default what CUDA sees). The launcher calls this before starting torchrun."""
    if device_name == "cpu":
        return
    count = torch.cuda.device_count() if visible is None else visible
    if device_name == "auto" and count == 0:
        return  # auto without GPUs trains on CPU
    if count == 0:
        raise DeviceError("train.device=cuda but no CUDA device is visible; use train.device=cpu or auto")
    if nproc_per_node > count:
        raise DeviceError(
            f"torchrun.nproc_per_node={nproc_per_node} but only {count} GPU(s) are visible on this node "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}); "
            f"set torchrun.nproc_per_node to at most {count}"
        )


def setup(device_name: str) -> DistEnv:
    """Read torchrun's env; start the process group when there is more than one process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_name, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    return DistEnv(rank, world_size, local_rank, device)


def teardown(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_objects(obj, env: DistEnv) -> list:
    if not env.distributed:
        return [obj]
    out: list = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def raise_if_any(env: DistEnv, error: Optional[BaseException], what: str, exc_type=RuntimeError) -> None:
    """Every rank learns whether any rank failed, so none is left waiting in a collective."""
    errors = all_gather_objects(None if error is None else f"{type(error).__name__}: {error}", env)
    bad = [(r, e) for r, e in enumerate(errors) if e is not None]
    if not bad:
        return
    if len(bad) == 1 and isinstance(error, exc_type):
        raise error  # only this rank failed, with the right kind of error: keep its message as is
    detail = "; ".join(f"rank {r}: {e}" for r, e in bad)
    raise exc_type(f"{what} failed ({detail})") from error


def broadcast_object(obj, env: DistEnv):
    """Rank 0's value on every rank."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def local(t: torch.Tensor) -> torch.Tensor:
    """The shard this rank holds (a plain tensor is its own shard)."""
    return t.to_local() if hasattr(t, "to_local") else t


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (a collective for sharded tensors: every rank must call it)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def full_like(piece: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The whole tensor of which ``piece`` is this rank's part, sharded like ``p`` (a collective when
    ``p`` is sharded), on ``p``'s device."""
    if not hasattr(p, "device_mesh"):
        return piece
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(piece.to(p.device), p.device_mesh, p.placements, shape=p.shape, stride=p.stride(),
                              run_check=False).full_tensor()
