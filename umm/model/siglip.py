"""SigLIP NaViT vision encoder as BAGEL uses it: variable resolution, no RoPE, per-image attention.

Module names follow ``vit_model.vision_model.*`` of the checkpoint. The patch embedding is the
Linear [hidden, patch*patch*3] with input order (kh, kw, c), as upstream stores it.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from umm.model.config import ViTConfig
from umm.model.dynamic_rows import needs_grad_like_later_layers, rows_vary
from umm.model.embeddings import activation


class SiglipEmbeddings(nn.Module):
    def __init__(self, cfg: ViTConfig, max_num_patch_per_side: int):
        super().__init__()
        self.patch_embedding = nn.Linear(cfg.num_channels * cfg.patch_size**2, cfg.hidden_size)
        self.position_embedding = nn.Embedding(max_num_patch_per_side**2, cfg.hidden_size)

    def forward(self, patches: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.patch_embedding(patches.to(self.patch_embedding.weight.dtype)) + self.position_embedding(position_ids)


class SiglipAttention(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        h = cfg.hidden_size
        self.num_heads, self.head_dim = cfg.num_attention_heads, h // cfg.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(h, h) for _ in range(4))

    def forward(self, x: torch.Tensor, attend: Callable) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = (p(x).view(n, self.num_heads, self.head_dim) for p in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(attend(q, k, v).reshape(n, -1))


class SiglipMLP(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = activation(cfg.extra.get("hidden_act", "gelu_pytorch_tanh"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SiglipEncoderLayer(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = SiglipAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = SiglipMLP(cfg)

    def forward(self, x: torch.Tensor, attend: Callable) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), attend)
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Module):
    def __init__(self, cfg: ViTConfig, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(cfg) for _ in range(num_layers))


class SiglipVisionTransformer(nn.Module):
    def __init__(self, cfg: ViTConfig, num_layers: int, max_num_patch_per_side: int):
        super().__init__()
        self.embeddings = SiglipEmbeddings(cfg, max_num_patch_per_side)
        self.encoder = SiglipEncoder(cfg, num_layers)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, patches: torch.Tensor, position_ids: torch.Tensor, attend: Callable) -> torch.Tensor:
        x = needs_grad_like_later_layers(self.embeddings(patches, position_ids), self.encoder)
        rows_vary(x)
        for layer in self.encoder.layers:
            x = layer(x, attend)
        return self.post_layernorm(x)


class SiglipVisionModel(nn.Module):
    """``attend`` is a ``PackedAttention`` with one ``full`` split per image."""

    def __init__(self, cfg: ViTConfig, num_layers: int, max_num_patch_per_side: int):
        super().__init__()
        self.vision_model = SiglipVisionTransformer(cfg, num_layers, max_num_patch_per_side)

    def forward(self, patches: torch.Tensor, position_ids: torch.Tensor, attend: Callable) -> torch.Tensor:
        return self.vision_model(patches, position_ids, attend)
