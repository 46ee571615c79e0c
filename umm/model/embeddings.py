"""Bridges between the LLM and the image parts: timestep embedder, 2-D sin-cos tables, connector."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def sincos_2d_table(grid_size: int, dim: int) -> torch.Tensor:
    """MAE/DiT 2-D sin-cos table [grid_size**2, dim]; row r*grid_size + c.

    First half encodes the column, second half the row (upstream's meshgrid(w, h) order);
    each half is [sin, cos]. Computed in float64 like upstream's numpy code.
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos position table needs dim divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    coords = torch.arange(grid_size, dtype=torch.float32).to(torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")

    def half(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1, 1) * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([half(cols), half(rows)], dim=1).float()


class PositionEmbedding(nn.Module):
    """Fixed 2-D sin-cos table, kept as a frozen Parameter so it sits in the state dict as upstream."""

    def __init__(self, max_num_patch_per_side: int, hidden_size: int):
        super().__init__()
        self.max_num_patch_per_side = max_num_patch_per_side
        self.hidden_size = hidden_size
        self.pos_embed = nn.Parameter(torch.empty(max_num_patch_per_side**2, hidden_size), requires_grad=False)

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.pos_embed.copy_(sincos_2d_table(self.max_num_patch_per_side, self.hidden_size))

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return self.pos_embed[position_ids]


class TimestepEmbedder(nn.Module):
    """DiT timestep embedding of a continuous t in [0, 1]: cos-first 256-d features -> MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256, max_period: float = 10000.0):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.max_period = max_period
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )

    def timestep_features(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequency_embedding_size // 2
        freqs = torch.exp(
            -math.log(self.max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
        )
        args = t[:, None].float() * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        feats = self.timestep_features(t).to(self.mlp[0].weight.dtype)
        return self.mlp(feats)


_ACTIVATIONS = {
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "silu": F.silu,
}


def activation(name: str):
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(_ACTIVATIONS)}") from None


class MLPConnector(nn.Module):
    """ViT features -> LLM width: fc2(act(fc1(x)))."""

    def __init__(self, in_dim: int, out_dim: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.fc2 = nn.Linear(out_dim, out_dim)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))
