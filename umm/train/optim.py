"""AdamW over the trainable parameters only, and upstream's learning-rate schedules.

The schedule is a pure function of the optimizer step (transformers' constant-with-warmup and
cosine-with-min-lr, as upstream uses), so resuming needs only the step, not a scheduler object.
"""
from __future__ import annotations

import math
from typing import Iterable, List

import torch

from umm.config.schema import OptimConfig
from umm.train.adamw_ema import AdamWEma
from umm.train.distributed import full


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimConfig, device: torch.device):
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: check method.trainable (or method.lora)")
    if len(cfg.betas) != 2:
        raise ValueError(f"optim.betas must have two values, got {list(cfg.betas)}")
    fused = bool(cfg.fused) and device.type == "cuda"
    return AdamWEma(
        params,
        lr=cfg.lr,
        betas=(float(cfg.betas[0]), float(cfg.betas[1])),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        fused=fused or None,
        foreach=None if fused else True,
    )


def clip_for_step(optimizer: torch.optim.Optimizer, params: List[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Global L2 norm of the gradients (all ranks); the next ``optimizer.step()`` applies them clipped
    to ``max_norm`` (no clipping when max_norm <= 0).

    A fused AdamW takes the clip factor as its ``grad_scale`` (the divisor it already supports for
    loss scaling), which saves a read and a write of every gradient; other optimizers get the
    gradients rescaled in place first. The factor stays on the device: no host sync.
    """
    limit = max_norm if max_norm and max_norm > 0 else float("inf")
    if not optimizer.defaults.get("fused"):
        return full(torch.nn.utils.clip_grad_norm_(params, limit, foreach=True))
    grads = [p.grad for p in params if p.grad is not None]
    norm = full(torch.nn.utils.get_total_norm(grads, foreach=True))
    # clip_grad_norm_'s factor max_norm / (norm + 1e-6), capped at 1, as a divisor.
    optimizer.grad_scale = torch.clamp((norm.float() + 1e-6) / limit, min=1.0)
    return norm


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
