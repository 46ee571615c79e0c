"""Qwen2 language model with Mixture-of-Transformers layers (BAGEL's ``Qwen2MoTDecoderLayer``).

Every layer holds two experts: understanding (Qwen's own names) and generation (``*_moe_gen``).
Both share one attention over the packed sequence. To route without masks, the residual stream is
kept in *expert order*: all understanding tokens first, then all generation tokens
(``ExpertRouting.perm``). Norms, projections and MLPs then run on two contiguous slices; only
q/k/v (into sequence order, for attention) and the attention output (back to expert order) are
gathered. Parameter names and shapes match the checkpoint (reference/bagel.md §1.3).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

try:  # ints that torch.compile keeps dynamic (recent torch); older torch specialises on them
    from torch.fx.experimental.sym_node import DynamicInt
except ImportError:
    DynamicInt = None

from umm.model.config import LLMConfig
from umm.model.dynamic_rows import needs_grad_like_later_layers, rows_vary


class RMSNorm(nn.Module):
    """Qwen2 RMSNorm: normalise in fp32, cast back, then scale."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class RotaryEmbedding(nn.Module):
    """Default Qwen2 RoPE (half-split rotate), computed from 1-D packed position ids."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self.register_buffer("inv_freq", self._inv_freq(), persistent=False)

    def _inv_freq(self, device=None) -> torch.Tensor:
        return 1.0 / (
            self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float() / self.head_dim)
        )

    def reset_parameters(self, device=None) -> None:
        # Needed after a meta-device build: the buffer is not in the checkpoint.
        if device is None and not self.inv_freq.is_meta:
            device = self.inv_freq.device
        self.inv_freq = self._inv_freq(device=device)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype):
        freqs = position_ids.float()[:, None] * self.inv_freq.float()[None]
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]  # [L, 1, D]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _PermuteRows(torch.autograd.Function):
    """``x[index]`` for a permutation ``index``, whose gradient is the gather ``grad[inverse]``.

    ``index_select``'s own backward is a scatter-add (atomics into a zeroed tensor): on one H100 the
    four per-layer reorderings of q/k/v/o cost 6 ms per step that way; a gather is a plain copy.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


@dataclass
class ExpertRouting:
    """Which tokens go to which expert, precomputed on the host side (no device syncs).

    ``perm``: sequence positions in expert order (und tokens, then gen tokens);
    ``inv_perm``: expert-order row of each sequence position; ``num_und``: size of the und slice.
    """

    perm: torch.Tensor
    inv_perm: torch.Tensor
    num_und: int
    num_gen: int

    @classmethod
    def from_indexes(cls, und: torch.Tensor, gen: torch.Tensor) -> "ExpertRouting":
        """``und`` / ``gen``: sequence positions of each expert's tokens (together a permutation)."""
        perm = torch.cat([und, gen.to(und.device)])
        inv_perm = torch.empty_like(perm)
        inv_perm[perm] = torch.arange(perm.numel(), device=perm.device)
        return cls(perm=perm, inv_perm=inv_perm, num_und=und.numel(), num_gen=gen.numel())

    def dynamic(self) -> "ExpertRouting":
        """The same routing with the expert sizes as dynamic ints for torch.compile (they change with
        every pack; plain ints are compiled in as constants)."""
        if DynamicInt is None:
            return self
        return ExpertRouting(self.perm, self.inv_perm, DynamicInt(self.num_und), DynamicInt(self.num_gen))

    def split(self, x: torch.Tensor):
        return x[: self.num_und], x[self.num_und :]

    def to_experts(self, x: torch.Tensor) -> torch.Tensor:
        """Rows in sequence order -> expert order."""
        return _PermuteRows.apply(x, self.perm, self.inv_perm)

    def to_sequence(self, x: torch.Tensor) -> torch.Tensor:
        """Rows in expert order -> sequence order."""
        return _PermuteRows.apply(x, self.inv_perm, self.perm)


# attend(q [L, Hq, D], k [L, Hkv, D], v, layer_index) -> [L, Hq, D] (attention.PackedAttention,
# or attention.CachedAttention at inference).
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


class MoTAttention(nn.Module):
    def __init__(self, cfg: LLMConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        h, d = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, d
        for suffix in ("", "_moe_gen"):
            setattr(self, f"q_proj{suffix}", nn.Linear(h, self.num_heads * d, bias=True))
            setattr(self, f"k_proj{suffix}", nn.Linear(h, self.num_kv_heads * d, bias=True))
            setattr(self, f"v_proj{suffix}", nn.Linear(h, self.num_kv_heads * d, bias=True))
            setattr(self, f"o_proj{suffix}", nn.Linear(self.num_heads * d, h, bias=False))
            setattr(self, f"q_norm{suffix}", RMSNorm(d, cfg.rms_norm_eps))
            setattr(self, f"k_norm{suffix}", RMSNorm(d, cfg.rms_norm_eps))
        self.freeze_und = False  # Qwen2MoTModel.set_freeze_und

    def _qkv(self, x: torch.Tensor, suffix: str, cos, sin):
        n = x.shape[0]
        q = getattr(self, f"q_proj{suffix}")(x).view(n, self.num_heads, self.head_dim)
        k = getattr(self, f"k_proj{suffix}")(x).view(n, self.num_kv_heads, self.head_dim)
        v = getattr(self, f"v_proj{suffix}")(x).view(n, self.num_kv_heads, self.head_dim)
        q = getattr(self, f"q_norm{suffix}")(q)
        k = getattr(self, f"k_norm{suffix}")(k)
        # qk-norm returns fp32 under autocast; attention runs in the projections' (autocast) dtype.
        return apply_rope(q, cos, sin).to(v.dtype), apply_rope(k, cos, sin).to(v.dtype), v

    def forward(self, x_und, x_gen, cos, sin, routing: ExpertRouting, attend: Attend):
        """x_und / x_gen: normed inputs of each expert (expert order); cos/sin in expert order."""
        cos_u, cos_g = routing.split(cos)
        sin_u, sin_g = routing.split(sin)
        parts = [self._qkv(x_und, "", cos_u, sin_u)]
        if self.freeze_und:  # generation queries see the understanding keys/values as constants
            parts = [tuple(t.detach() for t in parts[0])]
        if routing.num_gen:
            parts.append(self._qkv(x_gen, "_moe_gen", cos_g, sin_g))
        # Expert order -> sequence order for the shared attention.
        q, k, v = (routing.to_sequence(p[0] if len(parts) == 1 else torch.cat(p)) for p in zip(*parts))
        o = routing.to_experts(attend(q, k, v, self.layer_index).reshape(q.shape[0], -1))
        o_und, o_gen = routing.split(o)
        out_und = self.o_proj(o_und)
        out_gen = self.o_proj_moe_gen(o_gen) if routing.num_gen else o_gen
        return out_und, out_gen


class MoTDecoderLayer(nn.Module):
    def __init__(self, cfg: LLMConfig, layer_index: int):
        super().__init__()
        self.self_attn = MoTAttention(cfg, layer_index)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)
        self.mlp_moe_gen = MLP(cfg.hidden_size, cfg.intermediate_size)
        for name in ("input_layernorm", "post_attention_layernorm"):
            setattr(self, name, RMSNorm(cfg.hidden_size, cfg.rms_norm_eps))
            setattr(self, f"{name}_moe_gen", RMSNorm(cfg.hidden_size, cfg.rms_norm_eps))
        self.freeze_und = False  # Qwen2MoTModel.set_freeze_und

    def forward(self, x: torch.Tensor, cos, sin, routing: ExpertRouting, attend: Attend) -> torch.Tensor:
        """x: residual stream [L, H] in expert order."""
        x_und, x_gen = routing.split(x)
        if self.freeze_und:  # cuts the input embeddings and what und tokens took from gen tokens last layer
            x_und = x_und.detach()
        has_gen = routing.num_gen > 0
        a_und, a_gen = self.self_attn(
            self.input_layernorm(x_und),
            self.input_layernorm_moe_gen(x_gen) if has_gen else x_gen,
            cos,
            sin,
            routing,
            attend,
        )
        x_und = x_und + a_und
        x_und = x_und + self.mlp(self.post_attention_layernorm(x_und))
        if not has_gen:
            return x_und
        x_gen = x_gen + a_gen
        x_gen = x_gen + self.mlp_moe_gen(self.post_attention_layernorm_moe_gen(x_gen))
        return torch.cat([x_und, x_gen])


class Qwen2MoTModel(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(MoTDecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.norm_moe_gen = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)
        # Set by the trainer: wraps each layer call (activation checkpointing).
        self.layer_wrapper: Optional[Callable] = None
        self.freeze_und = False

    def set_freeze_und(self, on: bool) -> None:
        """Upstream's ``freeze_und``: the understanding tokens' activations are detached (input
        embeddings, Q/K/V, every layer's output, final norm), so no gradient flows through them,
        not even into generation weights via und tokens that attend to clean generation tokens.
        Detaching each layer's und input and its Q/K/V cuts the same paths as upstream's detaches
        of the attention and MLP outputs."""
        self.freeze_und = on
        for layer in self.layers:
            layer.freeze_und = layer.self_attn.freeze_und = on

    def forward(
        self,
        x: torch.Tensor,
        position_ids: torch.Tensor,
        routing: ExpertRouting,
        attend: Attend,
        hidden_per_layer: Optional[List[torch.Tensor]] = None,
    ) -> torch.Tensor:
        """x: input embeddings [L, H] in expert order. Returns the final-normed states, expert order."""
        cos, sin = self.rotary_emb(position_ids.index_select(0, routing.perm), x.dtype)
        x = needs_grad_like_later_layers(x, self.layers)
        rows_vary(x, cos, sin, routing.perm, routing.inv_perm)
        routing = routing.dynamic()
        for layer in self.layers:
            if self.layer_wrapper is not None:
                x = self.layer_wrapper(layer, x, cos, sin, routing, attend)
            else:
                x = layer(x, cos, sin, routing, attend)
            if hidden_per_layer is not None:
                hidden_per_layer.append(x)
        h_und, h_gen = routing.split(x)
        h_und = self.norm(h_und)
        if self.freeze_und:
            h_und = h_und.detach()
        if routing.num_gen == 0:
            return h_und
        return torch.cat([h_und, self.norm_moe_gen(h_gen)])


class Qwen2MoTForCausalLM(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.model = Qwen2MoTModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
