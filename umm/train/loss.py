"""Upstream's loss: global per-token means of CE and MSE across all ranks (reference/bagel.md §4).

Each rank sums its tokens' losses and divides by the token count of all ranks; the ``* world_size``
undoes the mean that FSDP's gradient reduction takes, so the gradient is that of one global mean.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from umm.config.schema import MethodConfig
from umm.data.transfer import to_device
from umm.train.distributed import DistEnv, all_reduce_sum


@dataclass
class LossParts:
    loss: torch.Tensor  # what backward runs on (already divided by grad_accum)
    ce: torch.Tensor  # detached global means, for logging
    mse: torch.Tensor
    ce_tokens: torch.Tensor  # global counts (0-dim, on the device)
    mse_tokens: torch.Tensor


def compute_loss(out, method: MethodConfig, env: DistEnv, grad_accum: int) -> LossParts:
    ce_tok, ce_w, mse_tok = out.ce_per_token, out.ce_weights, out.mse_per_token
    device = ce_tok.device if ce_tok is not None else mse_tok.device
    local_counts = to_device(torch.tensor(
        [0 if ce_tok is None else ce_tok.numel(), 0 if mse_tok is None else mse_tok.numel(), 0], dtype=torch.float64
    ), device)
    if ce_w is not None and ce_tok is not None:
        local_counts = local_counts + F.pad(ce_w.detach().double().sum()[None], (2, 0))
    # Counts stay on the device (no host sync mid-step); an empty side divides a zero sum by 1.
    n_ce, n_mse, w_sum = all_reduce_sum(local_counts, env).unbind()
    ws = env.world_size

    # An empty side still joins the graph (times zero) so every rank runs the same backward.
    if ce_tok is None:
        ce = torch.zeros((), device=device)
    elif method.ce_loss_reweighting:
        ce = (ce_tok * ce_w).sum() * ws / w_sum.clamp_min(1e-12).to(ce_tok.dtype)
    else:
        ce = ce_tok.sum() * ws / n_ce.clamp_min(1).to(ce_tok.dtype)
    if mse_tok is None:
        mse = torch.zeros((), device=device)
    else:
        mse = mse_tok.sum() * ws / n_mse.clamp_min(1).to(mse_tok.dtype)

    loss = (method.ce_weight * ce + method.mse_weight * mse) / grad_accum
    # Logged values are per-rank shares of the global mean; summed over ranks they give the mean.
    return LossParts(loss, ce.detach() / ws, mse.detach() / ws, n_ce, n_mse)
