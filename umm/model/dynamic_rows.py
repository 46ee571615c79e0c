"""Packed sequences vary in length from pack to pack: the compiled blocks take their token dimension
as dynamic from the first compile, instead of compiling once per length and then once more
dynamically (dynamo's default), which cost 6-12 s per recompile on an H100."""
from __future__ import annotations

import torch


def rows_vary(*tensors: torch.Tensor) -> None:
    """Mark dim 0 (the packed tokens) of each tensor dynamic for torch.compile; no effect in eager.
    ``maybe_``: a block that does need a fixed length specialises it instead of failing."""
    for t in tensors:
        torch._dynamo.maybe_mark_dynamic(t, 0)
