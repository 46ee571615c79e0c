"""What the compiled blocks see of their inputs, so that one graph serves every pack and every layer.

Packed sequences vary in length from pack to pack: the compiled blocks take their token dimension
as dynamic from the first compile, instead of compiling once per length and then once more
dynamically (dynamo's default), which cost 6-12 s per recompile on an H100."""
from __future__ import annotations

import torch
from torch import nn


def rows_vary(*tensors: torch.Tensor) -> None:
    """Mark dim 0 (the packed tokens) of each tensor dynamic for torch.compile; no effect in eager.
    ``maybe_``: a block that does need a fixed length specialises it instead of failing."""
    for t in tensors:
        torch._dynamo.maybe_mark_dynamic(t, 0)


def needs_grad_like_later_layers(x: torch.Tensor, blocks: nn.Module) -> torch.Tensor:
    """``x``, made to need a gradient where ``blocks`` train but ``x`` comes from frozen weights (LoRA
    behind a frozen embedding), so the first layer compiles the graph of the layers after it, whose
    inputs need one, instead of its own (seconds of every cold start). The cost: the first layer's
    input-gradient matmuls (its q/k/v projections'), a leaf gradient dropped as soon as it is made."""
    if torch.is_grad_enabled() and not x.requires_grad and any(p.requires_grad for p in blocks.parameters()):
        x = x.detach().requires_grad_()
        x.register_post_accumulate_grad_hook(_drop_grad)
    return x


def _drop_grad(leaf: torch.Tensor) -> None:
    leaf.grad = None  # nothing reads it; kept, it would live as long as the step's loss
