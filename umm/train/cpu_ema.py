"""fp32 EMA held in host memory and updated off the critical path (for models whose EMA does not fit
on the GPUs, e.g. the full 14.6B MoT on 4 × 80 GB).

After each optimizer step the (sharded) weights are copied into pinned host buffers on a side CUDA
stream, and host threads fold them into the EMA while the next step runs. The next optimizer
step waits (on the GPU, through an optimizer pre-hook) until that copy has finished, so the EMA sees
exactly the weights after every step, as :class:`~umm.train.ema.Ema` does. Without CUDA it falls
back to the synchronous update.

The fold is several threads over slices of the tensors (:func:`fold_into`): torchrun starts each
rank with one intra-op thread, and one thread folds about 10 GB/s, so the 3.6 B-parameter shard of
the full MoT on 4 GPUs (44 GB read and written per step) would take longer than the step.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional, Sequence, Tuple

import torch

from umm.train.distributed import local, start_thread
from umm.train.ema import Ema


def fold_threads() -> int:
    """This rank's share of the host's cores (the node's ranks fold at the same time), at most 8."""
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(8, (os.cpu_count() or 1) // ranks))


def fold_into(shadow: Sequence[torch.Tensor], current: Sequence[torch.Tensor], weight: float,
              pool: Optional[ThreadPoolExecutor] = None, n: int = 1) -> None:
    """``shadow += weight * (current - shadow)`` for every pair, as ``n`` tasks on ``pool``, each a
    contiguous slice of every tensor (the lerps release the GIL, so the threads run in parallel)."""
    if pool is None or n == 1:
        torch._foreach_lerp_(list(shadow), list(current), weight)
        return

    def part(i: int) -> None:
        s_parts, c_parts = [], []
        for s, c in zip(shadow, current):
            s_flat, c_flat = s.view(-1), c.reshape(-1)
            size = -(-s_flat.numel() // n)
            if i * size < s_flat.numel():
                s_parts.append(s_flat[i * size:(i + 1) * size])
                c_parts.append(c_flat[i * size:(i + 1) * size])
        if s_parts:
            torch._foreach_lerp_(s_parts, c_parts, weight)

    for f in [pool.submit(part, i) for i in range(n)]:
        f.result()


class AsyncCpuEma(Ema):
    def __init__(self, named_params: List[Tuple[str, torch.nn.Parameter]], decay: float,
                 optimizer: Optional[torch.optim.Optimizer] = None, threads: Optional[int] = None):
        self.cuda = bool(named_params) and local(named_params[0][1]).is_cuda
        super().__init__(named_params, decay, on_cpu=True)
        self._threads = fold_threads() if threads is None else threads
        self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="umm-ema") if self._threads > 1 else None
        self._thread: Optional[threading.Thread] = None
        if self.cuda:
            # Only the staging buffers are pinned (the copies from the GPU run asynchronously at full
            # speed); the EMA itself is ordinary host memory, touched by the host threads alone.
            self.staging = [torch.empty(s.shape, dtype=s.dtype, pin_memory=True) for s in self.shadow]
            # The copies run on the base class's side stream; its join() waits for the last one.
            self._stream = torch.cuda.Stream()
            if optimizer is not None:
                optimizer.register_step_pre_hook(lambda *_: self.join())

    def wait(self) -> None:
        """Block until the last update is folded into the EMA."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _fold(self, copied: torch.cuda.Event, skip: Optional[torch.Tensor]) -> None:
        copied.synchronize()
        if skip is None or not bool(skip):  # the step's skip flag, copied with the weights
            fold_into(self.shadow, self.staging, 1.0 - self.decay, self._pool, self._threads)

    @torch.no_grad()
    def update(self, found_inf: Optional[torch.Tensor] = None) -> None:
        """After each optimizer step; ``found_inf``: the optimizer's skip flag for this step. On CUDA it
        is copied with the weights and read by the fold thread, so the host never waits for it."""
        if not self.cuda:
            if found_inf is None or not bool(found_inf):
                fold_into(self.shadow, [local(p.detach()).float() for p in self.params], 1.0 - self.decay,
                          self._pool, self._threads)
            return
        self.wait()  # the staging buffers are free again
        self._stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self._stream):
            for s, p in zip(self.staging, self.params):
                s.copy_(local(p.detach()).float(), non_blocking=True)
            skip = None
            if found_inf is not None:
                skip = torch.empty((), dtype=found_inf.dtype, pin_memory=True)
                skip.copy_(found_inf, non_blocking=True)
            self._done = torch.cuda.Event()
            self._done.record(self._stream)
        self._thread = start_thread(self._fold, self._done, skip, name="umm-ema-fold")

    def full_state(self):
        self.wait()
        return super().full_state()

    def shards(self):
        self.wait()
        return super().shards()

    def load_shards(self, read) -> None:
        self.wait()
        super().load_shards(read)
