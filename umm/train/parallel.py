"""How the Bagel is made fast on GPUs: compiled blocks, activation checkpointing, FSDP2 with prefetch.

Order matters and follows torchtitan: checkpointing wraps each block's forward, ``torch.compile``
compiles each block (FSDP hooks stay outside the graph: dynamo skips them), then FSDP2 shards each
LLM layer and the root. Blocks are every LLM decoder layer and every ViT encoder layer; identical
blocks share one compiled graph, so compile time does not grow with depth.
"""
from __future__ import annotations

from typing import List

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from umm.errors import UmmError
from umm.config import recompute
from umm.train.distributed import DistEnv


class SpeedConfigError(UmmError, ValueError):
    """An unknown activation-checkpointing mode or an unusable sharding choice."""


def _block_lists(model: nn.Module):
    vit, llm = [], []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and name.split(".")[-1] == "layers":
            (vit if "vit_model" in name else llm).extend(mod)
    return vit, llm


def blocks_in_execution_order(model: nn.Module) -> List[nn.Module]:
    """ViT encoder layers first (they run first in the forward), then the LLM decoder layers."""
    vit, llm = _block_lists(model)
    return vit + llm


def apply_activation_checkpointing(model: nn.Module, ac: float | str) -> int:
    """Recompute block forwards in backward: ``ac`` is the share of the LLM's blocks that do (1 every
    block, 0 none, 0.5 every other one; or a name of :data:`recompute.NAMED`), spread evenly. Each
    block not recomputed keeps its activations: the share trades memory for time
    (umm/train/memory_plan.py counts both). The ViT's blocks all recompute once any LLM block does.

    The forward is replaced on the instance (not wrapped in a new module), so parameter names and
    checkpoint keys stay upstream's. Returns how many blocks were wrapped.
    """
    try:
        share = recompute.fraction(ac)
    except ValueError:
        raise SpeedConfigError(f"activation checkpointing {ac!r} is not one of {tuple(recompute.NAMED)} or a "
                               "fraction in [0, 1]") from None
    vit, llm = _block_lists(model)
    llm_recomputed = recompute.recomputed(len(llm), share)
    # A ViT with some blocks recomputed compiles one more ViT graph (seconds of every cold start) to
    # spare a recompute worth about 2 % of the step's FLOPs: all of them or none.
    wrap = (vit if llm_recomputed else []) + [llm[i] for i in llm_recomputed]
    for block in wrap:
        block.forward = _checkpointed(block.forward)
    return len(wrap)


def _checkpointed(forward):
    # A plain function, not functools.partial(checkpoint, ...): torch.compile traces the checkpoint
    # inside it as one region, where the partial made every checkpointed block silently run eagerly.
    def run(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


# What compiles the blocks; CPU tests set "aot_eager" (dynamo's guards and recompiles are the same,
# without inductor's C++ builds).
COMPILE_BACKEND = "inductor"


def compile_blocks(model: nn.Module) -> int:
    """``torch.compile`` each block in place (``nn.Module.compile``: names and state dict unchanged)."""
    # Dynamo keeps at most ``recompile_limit`` (8) graphs per code object and runs the rest eagerly. All
    # checkpointed blocks share one wrapper's code: the ViT and LLM blocks, inductor's guards on pack
    # sizes and the samples' no-grad graphs filled 7 of them on the slice through the app (BENCHMARKS.md).
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    n = 0
    for block in blocks_in_execution_order(model):
        block.compile(backend=COMPILE_BACKEND)
        n += 1
    return n


def shard(
    model: nn.Module,
    env: DistEnv,
    *,
    param_dtype: torch.dtype | None = torch.bfloat16,
    reshard_after_forward: bool = True,
    prefetch: int = 1,
) -> nn.Module:
    """FSDP2: one unit per LLM decoder layer, then the root (embeddings, lm_head, ViT, small heads).

    Ranks see different batches: one may have no ViT image or no generation token while another
    has. Every unit must run the same collectives on all ranks, so the ViT (skipped when a batch
    has no ViT tokens) stays in the root unit, which always runs, and parameters a rank did not
    use still join the gradient reduce-scatter with zeros (ViT layers as their own units hang or
    crash on mixed data: docs/ARCHITECTURE.md).

    Parameters stay fp32 (master weights); ``param_dtype`` is what the all-gather delivers for
    compute, and gradients are reduce-scattered in it too, as upstream's
    ``MixedPrecision(param=bf16, reduce=bf16)`` does (an fp32 reduce-scatter moved twice the bytes
    and spent 22 ms per step packing fp32 buckets on 4 H100s); each rank's shard of the gradient is
    fp32 again for the optimizer.

    ``prefetch`` layers ahead are all-gathered explicitly in forward and backward, so
    communication overlaps compute even when the CPU does not run ahead of the GPU.
    ``reshard_after_forward=False`` keeps gathered layers until backward (no second all-gather;
    more memory): worth it when the per-GPU model is small, as in short benchmark slices.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if prefetch < 0:
        raise SpeedConfigError(f"prefetch must be >= 0, got {prefetch}")
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=param_dtype)
    layers = _block_lists(model)[1]
    for layer in layers:
        fully_shard(layer, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    # The root's parameters are needed again at once by backward (lm_head): keep them gathered.
    fully_shard(model, mp_policy=mp, reshard_after_forward=False)
    if hasattr(model, "set_reduce_scatter_unused_params"):
        model.set_reduce_scatter_unused_params(True)
    elif env.is_main:  # torch < 2.13 (the pinned version has it): ranks must use the same parameters
        print("umm: this torch's FSDP2 cannot reduce-scatter unused parameters; batches whose ranks use "
              "different model parts (e.g. ViT images on one rank only) can hang: use torch>=2.13", flush=True)
    if prefetch:
        for i, layer in enumerate(layers):
            ahead = layers[i + 1 : i + 1 + prefetch]
            behind = layers[max(0, i - prefetch) : i][::-1]
            if ahead:
                layer.set_modules_to_forward_prefetch(ahead)
            if behind:
                layer.set_modules_to_backward_prefetch(behind)
    return model


def prepare(
    model: nn.Module,
    env: DistEnv,
    *,
    ac: float | str = 0.0,
    compile: bool = True,
    param_dtype: torch.dtype | None = torch.bfloat16,
    reshard_after_forward: bool = True,
    fsdp: bool | None = None,
) -> nn.Module:
    """Checkpointing, then compile, then FSDP2; returns the model to train.

    ``fsdp=None`` shards when there is more than one process. ``fsdp=True`` also wraps a single
    process (a one-rank process group must exist): compute then runs on bf16 copies of the fp32
    weights, as on several GPUs and as upstream's FSDP recipe on one, instead of under autocast
    casts of fp32 weights (which also keeps the residual stream in fp32).
    """
    apply_activation_checkpointing(model, ac)
    if compile:
        compile_blocks(model)
    if env.distributed if fsdp is None else fsdp:
        model = shard(model, env, param_dtype=param_dtype, reshard_after_forward=reshard_after_forward)
    return model
