"""AdamW whose CUDA step also updates the fp32 EMA and the bf16 compute weights, in one pass over memory.

The optimizer step and the EMA are both memory-bound: torch's fused AdamW reads weight, gradient
and both moments and writes three of them (28 bytes per parameter), then the EMA reads the weight
and the EMA again and writes the EMA (12 bytes). One Triton kernel per tensor does both while the
values are in registers: 36 bytes per parameter instead of 40, in one launch instead of two passes
(on one H100 the two passes took 39 + 13 ms for the 3.05 B parameters of the 4-layer slice).

With fp32 master weights held here (:meth:`AdamWEma.attach_compute`, Megatron's "main params" in
the optimizer) the model's own parameters are bf16: the forward reads them as they are and backward
writes bf16 gradients, where fp32 parameters under autocast cost a cast of every weight in each
forward and of every gradient in each backward (11.7 ms per step on the 4-layer slice). The kernel
then reads the bf16 gradient and also writes the bf16 weight: 36 bytes per parameter again.

Everything else is torch's AdamW: the same hyperparameters, ``state`` (``step``, ``exp_avg``,
``exp_avg_sq``, so checkpoints are interchangeable), ``grad_scale`` (how clipping reaches the
fused step: :func:`umm.train.optim.clip_for_step`), ``found_inf`` (a device flag that skips the whole
update, EMA included, when nonzero: how a non-finite step is skipped without the host reading the loss
first) and math. For tensors the kernel does not take (not CUDA, not contiguous), the step is torch's,
then the EMA ``lerp`` and the bf16 copy; there the host reads ``found_inf`` (a sync, free on the CPU).
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
    def adamw_ema(p_ptr, g_ptr, m_ptr, v_ptr, e_ptr, c_ptr, step_ptr, scale_ptr, skip_ptr, n, lr, beta1, beta2,
                  log2_beta1, log2_beta2, eps, weight_decay, ema_keep, HAS_SCALE: tl.constexpr,
                  HAS_EMA: tl.constexpr, HAS_COPY: tl.constexpr, HAS_SKIP: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        if HAS_SKIP:  # a skipped step stores nothing (its step count was not incremented either)
            mask = mask & (tl.load(skip_ptr) == 0)
        # step was already incremented for this update (as torch's fused step does before its kernel).
        step = tl.load(step_ptr)
        bias1 = 1.0 - tl.exp2(step * log2_beta1)
        bias2_sqrt = tl.sqrt(1.0 - tl.exp2(step * log2_beta2))
        g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
        if HAS_SCALE:
            g = g / tl.load(scale_ptr)
        p = tl.load(p_ptr + offs, mask=mask)
        m = tl.load(m_ptr + offs, mask=mask)
        v = tl.load(v_ptr + offs, mask=mask)
        p = p - lr * weight_decay * p
        m = beta1 * m + (1.0 - beta1) * g
        v = beta2 * v + (1.0 - beta2) * g * g
        p = p - (lr / bias1) * m / (tl.sqrt(v) / bias2_sqrt + eps)
        if HAS_EMA:
            e = tl.load(e_ptr + offs, mask=mask)
            e = ema_keep * e + (1.0 - ema_keep) * p
            tl.store(e_ptr + offs, e, mask=mask)
        if HAS_COPY:
            tl.store(c_ptr + offs, p.to(c_ptr.dtype.element_ty), mask=mask)
        tl.store(p_ptr + offs, p, mask=mask)
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(v_ptr + offs, v, mask=mask)

    _KERNEL = (adamw_ema, triton.cdiv)
    return _KERNEL


def _kernel_takes(*tensors: Optional[torch.Tensor]) -> bool:
    """Weight, gradient, then the optional EMA and compute copy: all CUDA and contiguous, the weight fp32."""
    present = [t for t in tensors if t is not None]
    return present[0].dtype == torch.float32 and all(t.is_cuda and t.is_contiguous() for t in present)


class AdamWEma(torch.optim.AdamW):
    """``torch.optim.AdamW`` that can carry an EMA of its parameters (:meth:`attach_ema`) and write
    bf16 compute copies of them (:meth:`attach_compute`)."""

    BLOCK = 2048

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._ema: Dict[int, torch.Tensor] = {}
        self._ema_decay = 0.0
        self._compute: Dict[int, torch.Tensor] = {}  # id(master) -> compute parameter
        self._master_of: Dict[int, torch.Tensor] = {}  # id(compute parameter) -> master

    def attach_ema(self, params: List[torch.Tensor], shadows: List[torch.Tensor], decay: float) -> bool:
        """From now on every step also does ``shadow = decay * shadow + (1 - decay) * param``.

        Only a fused optimizer (``optim.fused``, CUDA) takes the EMA; returns whether it did.
        """
        if not self.defaults.get("fused"):
            return False
        self._ema = {id(p): s for p, s in zip(params, shadows)}
        self._ema_decay = decay
        return True

    def attach_compute(self, params: List[torch.Tensor], compute: List[torch.nn.Parameter]) -> None:
        """``params`` (all of this optimizer's fp32 tensors) are the master weights of ``compute``
        (the model's lower-precision parameters): steps read the gradients of ``compute`` and write
        the updated weights into them, rounded."""
        own = {id(p) for g in self.param_groups for p in g["params"]}
        if len(params) != len(compute) or {id(p) for p in params} != own:
            raise ValueError("attach_compute needs one compute parameter for each of the optimizer's parameters")
        self._compute = {id(p): c for p, c in zip(params, compute)}
        self._master_of = {id(c): p for p, c in zip(params, compute)}

    @property
    def takes_grad_scale(self) -> bool:
        """Whether ``step`` divides the gradients by ``self.grad_scale`` (clipping: optim.clip_for_step)."""
        return bool(self.defaults.get("fused") or self._compute)

    def _grad(self, p: torch.Tensor) -> Optional[torch.Tensor]:
        c = self._compute.get(id(p))
        return p.grad if c is None else c.grad

    def _local_compute(self, p: torch.Tensor) -> Optional[torch.Tensor]:
        c = self._compute.get(id(p))
        return None if c is None else local(c)

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for c in self._compute.values():
            if set_to_none:
                c.grad = None
            elif c.grad is not None:
                c.grad.zero_()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        stepped = [p for g in self.param_groups for p in g["params"] if self._grad(p) is not None]
        if stepped and self.defaults.get("fused") and (self._ema or self._compute) and all(
                _kernel_takes(local(p), local(self._grad(p)), self._ema.get(id(p)), self._local_compute(p))
                for p in stepped):
            self._triton_step()
        elif self.defaults.get("fused") and not self._ema and not self._compute:
            super().step()  # torch's fused step skips on found_inf by itself, on the device
        elif not self._skipped_on_host():
            self._torch_step(stepped)
        return loss

    def _skipped_on_host(self) -> bool:
        """Whether ``found_inf`` asks to skip this step, read on the host: torch's step honours it only
        when fused, and knows nothing of the EMA and the compute copies."""
        found_inf: Optional[torch.Tensor] = getattr(self, "found_inf", None)
        return found_inf is not None and bool(found_inf)

    def _torch_step(self, stepped: List[torch.Tensor]) -> None:
        """torch's AdamW on the fp32 weights, then the EMA and the compute copies (a skipped step is
        never passed here)."""
        computes = [self._compute[id(p)] for p in stepped if id(p) in self._compute]
        scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        if computes:  # the masters get fp32 copies of the compute gradients, clipped here in fp32
            grads = [c.grad.float() for c in computes]
            if scale is not None:
                torch._foreach_div_(grads, scale)
            for c, g in zip(computes, grads):
                self._master_of[id(c)].grad = g
            self.grad_scale = None
        self.found_inf = None  # already read: torch's foreach step refuses one
        try:
            super().step()
        finally:
            self.grad_scale, self.found_inf = scale, found_inf
        if not stepped:
            return
        if self._ema:
            torch._foreach_lerp_([self._ema[id(p)] for p in stepped], [local(p).float() for p in stepped],
                                 1.0 - self._ema_decay)
        if computes:
            torch._foreach_copy_([local(c) for c in computes], [local(self._master_of[id(c)]) for c in computes])
            for c in computes:
                self._master_of[id(c)].grad = None

    def _triton_step(self) -> None:
        kernel, cdiv = _kernel()
        scale: Optional[torch.Tensor] = getattr(self, "grad_scale", None)
        found_inf: Optional[torch.Tensor] = getattr(self, "found_inf", None)
        for group in self.param_groups:
            if group["maximize"] or group["amsgrad"]:
                raise ValueError("AdamWEma's fused EMA step supports neither maximize nor amsgrad")
            params = [p for p in group["params"] if self._grad(p) is not None]
            for p in params:
                state = self.state[p]
                if not state:  # as torch's fused AdamW lays it out (DTensor moments for DTensor weights)
                    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            steps = [self.state[p]["step"] for p in params]
            torch._foreach_add_(steps, 1.0)
            if found_inf is not None:  # as torch's fused step: a skipped update does not count
                torch._foreach_sub_(steps, [found_inf.to(torch.float32)] * len(steps))
            beta1, beta2 = group["betas"]
            lr = float(group["lr"])
            for p, step in zip(params, steps):
                w, g = local(p), local(self._grad(p))
                ema, compute = self._ema.get(id(p)), self._local_compute(p)
                state = self.state[p]
                n = w.numel()
                kernel[(cdiv(n, self.BLOCK),)](
                    w, g, local(state["exp_avg"]), local(state["exp_avg_sq"]), w if ema is None else ema,
                    w if compute is None else compute, step, scale if scale is not None else step,
                    found_inf if found_inf is not None else step, n, lr, beta1, beta2, math.log2(beta1),
                    math.log2(beta2), group["eps"], group["weight_decay"], self._ema_decay,
                    HAS_SCALE=scale is not None, HAS_EMA=ema is not None, HAS_COPY=compute is not None,
                    HAS_SKIP=found_inf is not None, BLOCK=self.BLOCK, num_warps=8,
                )
