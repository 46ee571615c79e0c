"""AdamW whose CUDA step also updates the fp32 EMA, in one pass over memory.

The optimizer step and the EMA are both memory-bound: torch's fused AdamW reads weight, gradient
and both moments and writes three of them (28 bytes per parameter), then the EMA reads the weight
and the EMA again and writes the EMA (12 bytes). One Triton kernel per tensor does both while the
values are in registers: 36 bytes per parameter instead of 40, in one launch instead of two passes
(on one H100 the two passes took 39 + 13 ms for the 3.05 B parameters of the 4-layer slice).

Everything else is torch's AdamW: the same hyperparameters, ``state`` (``step``, ``exp_avg``,
``exp_avg_sq``, so checkpoints are interchangeable), ``grad_scale`` (how clipping reaches the
fused step: :func:`umm.train.optim.clip_for_step`) and math. Without an attached EMA, or for
tensors the kernel does not take (not CUDA, not fp32, not contiguous), the step is torch's and the
EMA is a separate ``lerp``.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch

from umm.train.distributed import local

_KERNEL = None


def _kernel():
    """The Triton kernel, built on first use (Triton is imported only on CUDA machines)."""
    global _KERNEL
    if _KERNEL is not None:
        return _KERNEL
    import triton
    import triton.language as tl

    @triton.jit
    def adamw_ema(p_ptr, g_ptr, m_ptr, v_ptr, e_ptr, step_ptr, scale_ptr, n, lr, beta1, beta2, log2_beta1,
                  log2_beta2, eps, weight_decay, ema_keep, HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        # step was already incremented for this update (as torch's fused step does before its kernel).
        step = tl.load(step_ptr)
        bias1 = 1.0 - tl.exp2(step * log2_beta1)
        bias2_sqrt = tl.sqrt(1.0 - tl.exp2(step * log2_beta2))
        g = tl.load(g_ptr + offs, mask=mask)
        if HAS_SCALE:
            g = g / tl.load(scale_ptr)
        p = tl.load(p_ptr + offs, mask=mask)
        m = tl.load(m_ptr + offs, mask=mask)
        v = tl.load(v_ptr + offs, mask=mask)
        p = p - lr * weight_decay * p
        m = beta1 * m + (1.0 - beta1) * g
        v = beta2 * v + (1.0 - beta2) * g * g
        p = p - (lr / bias1) * m / (tl.sqrt(v) / bias2_sqrt + eps)
        e = tl.load(e_ptr + offs, mask=mask)
        e = ema_keep * e + (1.0 - ema_keep) * p
        tl.store(p_ptr + offs, p, mask=mask)
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(v_ptr + offs, v, mask=mask)
        tl.store(e_ptr + offs, e, mask=mask)

    _KERNEL = (adamw_ema, triton.cdiv)
    return _KERNEL


def _kernel_takes(p: torch.Tensor, g: torch.Tensor, e: torch.Tensor) -> bool:
    return (p.is_cuda and p.dtype == g.dtype == e.dtype == torch.float32
            and p.is_contiguous() and g.is_contiguous() and e.is_contiguous())


class AdamWEma(torch.optim.AdamW):
    """``torch.optim.AdamW`` that can carry an EMA of its parameters (:meth:`attach_ema`)."""

    BLOCK = 2048

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._ema: Dict[int, torch.Tensor] = {}
        self._ema_decay = 0.0

    def attach_ema(self, params: List[torch.Tensor], shadows: List[torch.Tensor], decay: float) -> bool:
        """From now on every step also does ``shadow = decay * shadow + (1 - decay) * param``.

        Only a fused optimizer (``optim.fused``, CUDA) takes the EMA; returns whether it did.
        """
        if not self.defaults.get("fused"):
            return False
        self._ema = {id(p): s for p, s in zip(params, shadows)}
        self._ema_decay = decay
        return True

    @torch.no_grad()
    def step(self, closure=None):
        if not self._ema:
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        stepped = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        if stepped and all(_kernel_takes(local(p), local(p.grad), self._ema[id(p)]) for p in stepped):
            self._triton_step()
        else:
            super().step()
            if stepped:
                torch._foreach_lerp_([self._ema[id(p)] for p in stepped], [local(p).float() for p in stepped],
                                     1.0 - self._ema_decay)
        return loss

    def _triton_step(self) -> None:
        kernel, cdiv = _kernel()
        scale: Optional[torch.Tensor] = getattr(self, "grad_scale", None)
        for group in self.param_groups:
            if group["maximize"] or group["amsgrad"]:
                raise ValueError("AdamWEma's fused EMA step supports neither maximize nor amsgrad")
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                state = self.state[p]
                if not state:  # as torch's fused AdamW lays it out (DTensor moments for DTensor weights)
                    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            steps = [self.state[p]["step"] for p in params]
            torch._foreach_add_(steps, 1.0)
            beta1, beta2 = group["betas"]
            lr = float(group["lr"])
            for p, step in zip(params, steps):
                w, g = local(p), local(p.grad)
                state = self.state[p]
                n = w.numel()
                kernel[(cdiv(n, self.BLOCK),)](
                    w, g, local(state["exp_avg"]), local(state["exp_avg_sq"]), self._ema[id(p)], step,
                    scale if scale is not None else step, n, lr, beta1, beta2, math.log2(beta1), math.log2(beta2),
                    group["eps"], group["weight_decay"], self._ema_decay,
                    HAS_SCALE=scale is not None, BLOCK=self.BLOCK, num_warps=8,
                )
