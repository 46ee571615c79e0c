"""Upstream's loss: global per-token means of CE and MSE across all ranks (reference/bagel.md §4).

Each rank sums its tokens' losses and divides by the token count of all ranks; the ``* world_size``
undoes the mean that FSDP's gradient reduction takes, so the gradient is that of one global mean.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from umm.config.schema import MethodConfig
from umm.train.distributed import DistEnv, all_reduce_sum


@dataclass
class LossParts:
    loss: torch.Tensor  # what backward runs on (already divided by grad_accum)
    ce: torch.Tensor  # detached global means, for logging
    mse: torch.Tensor
    ce_tokens: int
    mse_tokens: int


def compute_loss(out, method: MethodConfig, env: DistEnv, grad_accum: int) -> LossParts:
    ce_tok, ce_w, mse_tok = out.ce_per_token, out.ce_weights, out.mse_per_token
    device = ce_tok.device if ce_tok is not None else mse_tok.device
    local_counts = torch.tensor(
        [
            0 if ce_tok is None else ce_tok.numel(),
            0 if mse_tok is None else mse_tok.numel(),
            0.0 if ce_w is None or ce_tok is None else float(ce_w.detach().float().sum()),
        ],
        dtype=torch.float64,
        device=device,
    )
    n_ce, n_mse, w_sum = all_reduce_sum(local_counts, env).tolist()
    ws = env.world_size

    # An empty side still joins the graph (times zero) so every rank runs the same backward.
    if ce_tok is None or n_ce == 0:
        ce = torch.zeros((), device=device) if ce_tok is None else ce_tok.sum() * 0.0
    elif method.ce_loss_reweighting:
        ce = (ce_tok * ce_w).sum() * ws / max(w_sum, 1e-12)
    else:
        ce = ce_tok.sum() * ws / n_ce
    if mse_tok is None or n_mse == 0:
        mse = torch.zeros((), device=device) if mse_tok is None else mse_tok.sum() * 0.0
    else:
        mse = mse_tok.sum() * ws / n_mse

    loss = (method.ce_weight * ce + method.mse_weight * mse) / grad_accum
    # Logged values are per-rank shares of the global mean; summed over ranks they give the mean.
    return LossParts(loss, ce.detach() / ws, mse.detach() / ws, int(n_ce), int(n_mse))
