"""AdamW over the trainable parameters only (their fp32 master weights, where the model computes
with bf16 ones), and upstream's learning-rate schedules.

The schedule is a pure function of the optimizer step (transformers' constant-with-warmup and
cosine-with-min-lr, as upstream uses), so resuming needs only the step, not a scheduler object.
"""
from __future__ import annotations

import math
from typing import Iterable, List, Optional, Tuple

import torch

from umm.config.schema import OptimConfig, TrainConfig
from umm.train.adamw_ema import AdamWEma
from umm.train.distributed import full


def master_weights_in_optimizer(train: TrainConfig, optim: OptimConfig, device: torch.device) -> bool:
    """Where ``train.master_weights`` puts the fp32 master weights: True for the optimizer (bf16
    model parameters, :func:`split_master_weights`), False for the parameters themselves.

    ``auto`` picks the optimizer where it fits (:meth:`TrainConfig.masters_fit_optimizer`) and the
    fused CUDA step reads bf16 gradients and writes bf16 weights. The config validation rejects an
    explicit ``optimizer`` where it does not fit.
    """
    if train.master_weights == "params":
        return False
    if train.master_weights == "optimizer":
        if not train.masters_fit_optimizer():
            raise ValueError("train.master_weights=optimizer needs train.precision=bf16 and train.grad_accum=1; "
                             "use train.master_weights=auto")
        return True
    return train.masters_fit_optimizer() and device.type == "cuda" and bool(optim.fused)


@torch.no_grad()
def split_master_weights(model: torch.nn.Module, named: List[Tuple[str, torch.nn.Parameter]],
                         dtype: torch.dtype = torch.bfloat16) -> List[Tuple[str, torch.Tensor]]:
    """Turn these fp32 parameters of ``model`` into ``dtype`` compute weights and return their fp32
    master copies under the same names (sharded like the parameters under FSDP2).

    The Parameter objects stay (modules, compiled graphs and names are unchanged): the conversion
    goes through ``Module._apply``, which FSDP2 follows by re-registering its shards, so it then
    all-gathers bf16 weights without a cast and reduce-scatters bf16 gradients into bf16 shards.
    The optimizer updates the masters (:meth:`AdamWEma.attach_compute`), the EMA follows them, and
    checkpoints save them: the bf16 weights are only what the forward reads.
    """
    for name, p in named:
        if p.dtype != torch.float32:
            raise ValueError(f"master weights need fp32 parameters, {name} is {p.dtype}")
    masters = [(name, p.detach().clone().requires_grad_(True)) for name, p in named]
    ids = {id(p) for _, p in named}
    model._apply(lambda t: t.to(dtype) if id(t) in ids else t)
    return masters


def build_optimizer(params: Iterable[torch.Tensor], cfg: OptimConfig, device: torch.device,
                    compute: Optional[List[torch.nn.Parameter]] = None):
    """AdamW over ``params``; with ``compute`` (from :func:`split_master_weights`) ``params`` are
    the fp32 master weights of those model parameters."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: check method.trainable (or method.lora)")
    if len(cfg.betas) != 2:
        raise ValueError(f"optim.betas must have two values, got {list(cfg.betas)}")
    fused = bool(cfg.fused) and device.type == "cuda"
    optimizer = AdamWEma(
        params,
        lr=cfg.lr,
        betas=(float(cfg.betas[0]), float(cfg.betas[1])),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        fused=fused or None,
        foreach=None if fused else True,
    )
    if compute is not None:
        optimizer.attach_compute(params, compute)
    return optimizer


def optimizer_for(model: torch.nn.Module, trainable: List[Tuple[str, torch.nn.Parameter]], train: TrainConfig,
                  optim: OptimConfig, device: torch.device) -> Tuple[List[Tuple[str, torch.Tensor]], AdamWEma]:
    """The named fp32 tensors the optimizer updates (``trainable`` itself, or its masters where
    ``train.master_weights`` puts them in the optimizer) and the optimizer over them."""
    if not master_weights_in_optimizer(train, optim, device):
        return trainable, build_optimizer([p for _, p in trainable], optim, device)
    weights = split_master_weights(model, trainable)
    return weights, build_optimizer([w for _, w in weights], optim, device, compute=[p for _, p in trainable])


def clip_for_step(optimizer: torch.optim.Optimizer, params: List[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Global L2 norm of the gradients (all ranks); the next ``optimizer.step()`` applies them clipped
    to ``max_norm`` (no clipping when max_norm <= 0).

    A fused AdamW, or one with master weights, takes the clip factor as its ``grad_scale`` (the
    divisor fused steps already support for loss scaling), which saves a read and a write of every
    gradient and divides in fp32; other optimizers get the gradients rescaled in place first.
    The factor stays on the device: no host sync.
    """
    limit = max_norm if max_norm and max_norm > 0 else float("inf")
    if not getattr(optimizer, "takes_grad_scale", optimizer.defaults.get("fused")):
        return full(torch.nn.utils.clip_grad_norm_(params, limit, foreach=True))
    norm = full(total_norm([p.grad for p in params if p.grad is not None]))
    # clip_grad_norm_'s factor max_norm / (norm + 1e-6), capped at 1, as a divisor.
    optimizer.grad_scale = torch.clamp((norm.float() + 1e-6) / limit, min=1.0)
    return norm


def total_norm(grads: List[torch.Tensor]) -> torch.Tensor:
    """Global L2 norm, summed in fp32 also for bf16 gradients (torch's would round each tensor's norm
    to bf16)."""
    if all(g.dtype == torch.float32 for g in grads):
        return torch.nn.utils.get_total_norm(grads, foreach=True)
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0, dtype=torch.float32)))


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """LR for the optimizer step with 0-based index ``step``.

    constant: linear 0 → lr over warmup_steps, then lr.
    cosine: same warmup, then half a cosine from lr down to min_lr at total_steps.
    """
    warmup = cfg.warmup_steps
    if step < warmup:
        return cfg.lr * step / max(1, warmup)
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule != "cosine":
        raise ValueError(f"optim.schedule={cfg.schedule!r} is not one of constant, cosine")
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    floor = cfg.min_lr / cfg.lr if cfg.lr > 0 else 0.0
    return cfg.lr * (floor + (1 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
