"""Training recipes, one module per method: ``get_recipe(cfg.method)`` returns a ``Recipe``.

Each module exposes ``build(method_cfg) -> Recipe`` (see umm/methods/base.py for the interface).
"""
from __future__ import annotations

import importlib

from umm.config.names import RECIPE_NAMES as RECIPES
from umm.model.parts import PARTS

# The parts each recipe trains when method.trainable is empty. Here rather than in the recipe modules,
# which import torch, so the memory plan reads them in a dry run without it.
DEFAULT_TRAINABLE = {
    "sft": PARTS, "unicot": PARTS, "irg": PARTS,  # all but the autoencoder (not a Bagel part)
    "reca": ("llm_gen", "gen_heads"),  # the generation side (upstream's freeze_und)
}


def get_recipe(method_cfg):
    """The recipe named by ``method.recipe`` (modules are imported on demand: peft only for LoRA)."""
    name = method_cfg.recipe
    if name not in RECIPES:
        raise ValueError(f"method.recipe is {name!r}; choose one of {list(RECIPES)}")
    return importlib.import_module(f"umm.methods.{name}").build(method_cfg)
