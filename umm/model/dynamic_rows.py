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
    behind a frozen embedding). Every layer's input then needs one, so the first layer shares the
    others' compiled graph instead of compiling its own (seconds of every cold start), for a few
    small matmuls of input gradient in the first layer's backward."""
    if torch.is_grad_enabled() and not x.requires_grad and any(p.requires_grad for p in blocks.parameters()):
        return x.detach().requires_grad_()
    return x
