"""Exponential moving average of the trainable weights, fp32, sharded like the model.

``ema = decay * ema + (1 - decay) * param`` after every optimizer step from step 0, no warm-up or
bias correction (upstream). Frozen parameters never change, so their EMA is the parameter itself
and is not stored. Each rank keeps the EMA of its own shard (on the GPU, or in host memory with
``train.ema_on_cpu``); the full tensors are gathered only to save.

On the GPU the update is a pure memory-bound pass (read EMA and weights, write EMA). Given an
:class:`~umm.train.adamw_ema.AdamWEma`, the optimizer's own kernel does it while the weights are in
registers (``fuse``); given another optimizer it runs on a side stream, beside the next step's
forward, and the next optimizer step waits for it on the GPU (a step pre-hook). Either way the EMA
sees exactly the weights after every step. A step the optimizer skipped (``found_inf``, a non-finite
loss or gradient) is skipped here too: the fused kernel does not store, the side stream lerps with
weight 0, and the host paths read the flag.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch

from umm.train.distributed import full_like, local


class Ema:
    def __init__(self, named_params: List[Tuple[str, torch.nn.Parameter]], decay: float, on_cpu: bool = False,
                 optimizer: Optional[torch.optim.Optimizer] = None, fuse: bool = True):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"train.ema_decay must be in [0, 1], got {decay}")
        self.decay = decay
        self.names = [n for n, _ in named_params]
        self.params = [p for _, p in named_params]
        self.on_cpu = on_cpu
        self.shadow = [self._place(local(p.detach()).float().clone()) for p in self.params]
        self._stream: Optional[torch.cuda.Stream] = None  # set when updating beside the main stream
        self._done: Optional[torch.cuda.Event] = None  # the last update on that stream
        self.fused = False  # the optimizer's step updates the EMA
        if optimizer is not None and not on_cpu and self.shadow and self.shadow[0].is_cuda:
            attach = getattr(optimizer, "attach_ema", None) if fuse else None
            self.fused = bool(attach and attach(self.params, self.shadow, decay))
            if not self.fused:
                self._stream = torch.cuda.Stream(self.shadow[0].device)
                optimizer.register_step_pre_hook(lambda *_: self.join())

    def _place(self, t: torch.Tensor) -> torch.Tensor:
        return t.to("cpu") if self.on_cpu else t

    def join(self) -> None:
        """Make the current stream wait (on the GPU, not the host) for the last update."""
        if self._done is not None:
            torch.cuda.current_stream().wait_event(self._done)

    @torch.no_grad()
    def update(self, found_inf: Optional[torch.Tensor] = None) -> None:
        """After each optimizer step (a no-op where that step already updated the EMA); ``found_inf``:
        the optimizer's skip flag for this step."""
        if self.fused:
            return
        if self._stream is None:  # on the CPU, or into host memory: the copies wait for the GPU anyway
            if found_inf is None or not bool(found_inf):
                current = [self._place(local(p.detach()).float()) for p in self.params]
                torch._foreach_lerp_(self.shadow, current, 1.0 - self.decay)
            return
        self._stream.wait_stream(torch.cuda.current_stream())  # the optimizer step is done
        with torch.cuda.stream(self._stream):
            # On the GPU, with no host read: a skipped step's weight is 0.
            weight = 1.0 - self.decay
            if found_inf is not None:
                weight = [(1.0 - found_inf) * weight] * len(self.shadow)
            torch._foreach_lerp_(self.shadow, [local(p.detach()).float() for p in self.params], weight)
            self._done = torch.cuda.Event()
            self._done.record(self._stream)

    @torch.no_grad()
    def full_state(self) -> Dict[str, torch.Tensor]:
        """name → full fp32 EMA tensor (collective under FSDP2: call on every rank)."""
        return {name: full_like(s, p).detach().to("cpu", torch.float32) for name, p, s in self.shards()}

    def shards(self) -> List[Tuple[str, torch.Tensor, torch.Tensor]]:
        """[(name, parameter, this rank's EMA of it)] as of the last update; no collective."""
        self.join()
        return list(zip(self.names, self.params, self.shadow))

    @torch.no_grad()
    def load_shards(self, read: Callable[[str, torch.Tensor, torch.Tensor], bool]) -> None:
        """``read(name, param, shadow)``: fill ``shadow`` (fp32, on the GPU or, with ``ema_on_cpu``, in
        host memory) with this rank's shard of the saved EMA of ``param``, or return False when none was
        saved; one tensor at a time and straight into place, so a resume holds no second copy."""
        self.join()
        missing = [name for name, p, s in zip(self.names, self.params, self.shadow) if not read(name, p, s)]
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} trainable tensors, e.g. {missing[:3]}")
