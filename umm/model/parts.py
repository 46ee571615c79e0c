"""Which part of BAGEL a parameter belongs to (recipes train or freeze by part)."""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Dict, Iterable, List

if TYPE_CHECKING:  # torch-free at run time: the memory plan names parts in dry runs
    from torch import nn

PARTS = ("llm_und", "llm_gen", "embed", "lm_head", "vit", "connector", "gen_heads")

# Wrapper prefixes inserted by torch.compile, DDP/FSDP, activation checkpointing and peft.
_WRAPPERS = re.compile(r"(_orig_mod|module|_fsdp_wrapped_module|_checkpoint_wrapped_module|base_model\.model)\.")
_GEN_HEADS = ("time_embedder.", "vae2llm.", "llm2vae.", "latent_pos_embed.")


class UnknownPartError(ValueError):
    """A parameter name or part name that is not part of BAGEL."""


def canonical_name(name: str) -> str:
    """The checkpoint key of a parameter name seen through wrappers."""
    return _WRAPPERS.sub("", name)


def part_of(param_name: str) -> str:
    name = canonical_name(param_name)
    if name.startswith("language_model."):
        if name.startswith("language_model.model.embed_tokens."):
            return "embed"
        if name.startswith("language_model.lm_head."):
            return "lm_head"
        if name.startswith(("language_model.model.layers.", "language_model.model.norm")):
            return "llm_gen" if "_moe_gen" in name else "llm_und"
    elif name.startswith("vit_model."):
        return "vit"
    elif name.startswith(("connector.", "vit_pos_embed.")):
        return "connector"
    elif name.startswith(_GEN_HEADS):
        return "gen_heads"
    raise UnknownPartError(f"parameter {param_name!r} belongs to no BAGEL part ({', '.join(PARTS)})")


def check_parts(parts: Iterable[str]) -> List[str]:
    parts = list(parts)
    bad = [p for p in parts if p not in PARTS]
    if bad:
        raise UnknownPartError(f"unknown model parts {bad}; choose from {list(PARTS)}")
    return parts


def set_trainable(model: nn.Module, parts: Iterable[str]) -> Dict[str, int]:
    """requires_grad only for parameters of ``parts`` (fixed position tables never train).

    Returns the number of trainable parameters per part.
    """
    wanted = set(check_parts(parts))
    counts = {p: 0 for p in PARTS}
    for name, p in model.named_parameters():
        fixed = canonical_name(name).endswith("pos_embed.pos_embed")
        train = part_of(name) in wanted and not fixed
        p.requires_grad_(train)
        if train:
            counts[part_of(name)] += p.numel()
    return counts
