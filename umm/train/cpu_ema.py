"""fp32 EMA held in host memory and updated off the critical path (for models whose EMA does not fit
on the GPUs, e.g. the full 14.6B MoT on 4 × 80 GB).

After each optimizer step the (sharded) weights are copied into pinned host buffers on a side CUDA
stream, and a host thread folds them into the EMA while the next step runs. The next optimizer
step waits (on the GPU, through an optimizer pre-hook) until that copy has finished, so the EMA sees
exactly the weights after every step, as :class:`~umm.train.ema.Ema` does. Without CUDA it falls
back to the synchronous update.
"""
from __future__ import annotations

import threading
from typing import List, Optional, Tuple

import torch

from umm.train.distributed import local
from umm.train.ema import Ema


class AsyncCpuEma(Ema):
    def __init__(self, named_params: List[Tuple[str, torch.nn.Parameter]], decay: float,
                 optimizer: Optional[torch.optim.Optimizer] = None):
        self.cuda = bool(named_params) and local(named_params[0][1]).is_cuda
        super().__init__(named_params, decay, on_cpu=True)
        self._thread: Optional[threading.Thread] = None
        self._copied: Optional[torch.cuda.Event] = None
        if self.cuda:
            # Only the staging buffers are pinned (the copies from the GPU run asynchronously at full
            # speed); the EMA itself is ordinary host memory, touched by the host thread alone.
            self.staging = [torch.empty(s.shape, dtype=s.dtype, pin_memory=True) for s in self.shadow]
            self.stream = torch.cuda.Stream()
            if optimizer is not None:
                optimizer.register_step_pre_hook(lambda *_: self.join())

    def join(self) -> None:
        """Make the current stream wait (on the GPU) until the weights are copied out."""
        if self._copied is not None:
            torch.cuda.current_stream().wait_event(self._copied)

    def wait(self) -> None:
        """Block until the last update is folded into the EMA."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _fold(self, copied: torch.cuda.Event) -> None:
        copied.synchronize()
        torch._foreach_lerp_(self.shadow, self.staging, 1.0 - self.decay)

    @torch.no_grad()
    def update(self) -> None:
        if not self.cuda:
            return super().update()
        self.wait()  # the staging buffers are free again
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            for s, p in zip(self.staging, self.params):
                s.copy_(local(p.detach()).float(), non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record(self.stream)
        self._thread = threading.Thread(target=self._fold, args=(self._copied,), daemon=True)
        self._thread.start()

    def full_state(self):
        self.wait()
        return super().full_state()

    def load_full_state(self, state) -> None:
        self.wait()
        super().load_full_state(state)
