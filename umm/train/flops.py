"""Model FLOPs of one training step, by the formula of reference/perf-anchors.md (for MFU).

6 × (matmul parameters a token actually passes through: one MoT expert, the ViT only for ViT
tokens, lm_head only on CE rows) × tokens, plus attention over the allowed (query, key) pairs.
Recompute from activation checkpointing is not counted. Frozen weights (LoRA) need no weight
gradient, so they count 4 instead of 6 per parameter and token; the adapters count 6.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Dict

from umm.model.config import ModelDims

H100_BF16_DENSE_PEAK = 989e12


@dataclass(frozen=True)
class TokenCounts:
    tokens: int  # real sequence length
    ce: int  # CE rows
    vae: int  # all latent tokens (generation expert)
    mse: int  # noised latent tokens
    vit: int  # ViT patch tokens
    vit_sq: int  # sum over ViT images of n_patches^2
    pairs: int  # allowed (query, key) pairs of the LLM mask


def allowed_pairs(split_lens, attn_modes, sample_lens) -> int:
    """Count the (query, key) pairs the packed mask allows (``umm.model.attention.allowed``), split by
    split and in closed form (the dense mask took 0.3 s per 16k-token pack on the host, too slow to count
    every logged step): a query sees its own split whole (full, noise) or causally, and every earlier
    split of its own sample that is not noise."""
    samples = iter(sample_lens)
    left = visible = total = 0
    for n, mode in zip(split_lens, attn_modes):
        if left == 0:  # a new sample: nothing before it is visible
            left, visible = next(samples), 0
        total += n * visible + (n * (n + 1) // 2 if mode == "causal" else n * n)
        if mode != "noise":
            visible += n
        left -= n
    return total


def sum_counts(counts) -> TokenCounts:
    """Token counts of several micro-batches (or ranks) together; every FLOP term is linear in them."""
    counts = list(counts)
    return TokenCounts(*(sum(getattr(c, f.name) for c in counts) for f in fields(TokenCounts)))


def token_counts(batch) -> TokenCounts:
    """From a ``PackedBatch`` (host-side lists and tensor sizes only)."""
    return TokenCounts(
        tokens=batch.sequence_length,
        ce=int(batch.ce_loss_indexes.numel()),
        vae=batch.num_gen,
        mse=int(batch.mse_loss_indexes.numel()),
        vit=sum(batch.vit_token_seqlens),
        vit_sq=sum(n * n for n in batch.vit_token_seqlens),
        pairs=allowed_pairs(batch.split_lens, batch.attn_modes, batch.sample_lens),
    )


def bagel_step_flops(dims: ModelDims, c: TokenCounts, *, frozen_base: bool = False, lora_flops: float = 0.0) -> Dict[str, float]:
    """FLOPs per step by term; ``total`` is their sum."""
    llm, vit, bc = dims.llm, dims.vit, dims.bagel
    H, I, V, L = llm.hidden_size, llm.intermediate_size, llm.vocab_size, llm.num_hidden_layers
    h, kv, d = llm.num_attention_heads, llm.num_key_value_heads, llm.head_dim
    Hv, Iv, Lv = vit.hidden_size, vit.intermediate_size, dims.vit_num_layers
    z = bc.latent_token_dim
    patch_in = vit.num_channels * vit.patch_size**2
    k = 4 if frozen_base else 6
    p_layer = H * (h * d + 2 * kv * d) + h * d * H + 3 * H * I
    p_vit_layer = 4 * Hv * Hv + 2 * Hv * Iv
    terms = {
        "llm_layers": k * L * p_layer * c.tokens,
        "lm_head": k * H * V * c.ce,
        "vit": k * (Lv * p_vit_layer + patch_in * Hv) * c.vit,
        "connector": k * (Hv * H + H * H) * c.vit,
        "time_embedder": k * (256 * H + H * H) * c.vae,
        "vae_heads": k * z * H * c.vae + k * H * z * c.mse,
        "llm_attention": 12 * d * h * L * c.pairs,
        "vit_attention": 12 * Hv * Lv * c.vit_sq,
        "lora": lora_flops,
    }
    terms["total"] = sum(terms.values())
    return terms


@dataclass(frozen=True)
class LoraParams:
    """Adapter parameters by the tokens that pass through them: the ViT's, the generation expert's
    (VAE tokens) and the rest (every other token)."""

    vit: int
    gen: int
    und: int


def lora_params(model) -> LoraParams:
    """Walks the model once; the counts do not change over a run."""
    found = {"vit": 0, "gen": 0, "und": 0}
    for name, mod in model.named_modules():
        if not hasattr(mod, "lora_A") or not len(getattr(mod, "lora_A", {})):
            continue
        params = sum(p.numel() for p in mod.lora_A.parameters()) + sum(p.numel() for p in mod.lora_B.parameters())
        found["vit" if "vit_model" in name else "gen" if "_moe_gen" in name else "und"] += params
    return LoraParams(**found)


def lora_step_flops(params: LoraParams, c: TokenCounts) -> float:
    """6 × adapter parameters × the tokens that pass through each adapted module."""
    return float(6 * (params.vit * c.vit + params.gen * c.vae + params.und * (c.tokens - c.vae)))


def qwen2_anchor_flops(params_without_embedding: int, layers: int, seq: int, hidden: int) -> float:
    """perf-anchors.md anchor 1: 6 × params (no input embedding) × tokens + 6·L·s²·H (causal attention)."""
    return 6 * params_without_embedding * seq + 6 * layers * seq * seq * hidden


def mfu(flops_per_step: float, step_seconds: float, peak: float = H100_BF16_DENSE_PEAK) -> float:
    return flops_per_step / step_seconds / peak
