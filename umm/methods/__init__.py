"""Training recipes, one module per method: ``get_recipe(cfg.method)`` returns a ``Recipe``.

Each module exposes ``build(method_cfg) -> Recipe`` (see umm/methods/base.py for the interface).
"""
from __future__ import annotations

import importlib

from umm.config.names import RECIPE_NAMES as RECIPES


def get_recipe(method_cfg):
    """The recipe named by ``method.recipe`` (modules are imported on demand: peft only for LoRA)."""
    name = method_cfg.recipe
    if name not in RECIPES:
        raise ValueError(f"method.recipe is {name!r}; choose one of {list(RECIPES)}")
    return importlib.import_module(f"umm.methods.{name}").build(method_cfg)
