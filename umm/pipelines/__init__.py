"""Pipeline registry: ``pipeline.name`` -> the function that runs a validated config.

bagel, recA and unicot differ only in their config (method, data); they share the plain launch.
IRG wraps it per stage (umm/pipelines/irg.py). Entries are ``module:function`` strings so that
choosing a pipeline imports only what it needs. The config layer checks ``pipeline.name`` against
umm/config/names.py (tests/toolkit/test_layers.py keeps the two lists equal).
"""
from __future__ import annotations

import importlib
from typing import Callable, Dict

from umm.launch import launch_training

PIPELINES: Dict[str, str] = {
    "bagel": "umm.launch:launch_training",
    "recA": "umm.launch:launch_training",
    "unicot": "umm.launch:launch_training",
    "irg": "umm.pipelines.irg:launch",
}


def get_pipeline(name: str) -> Callable:
    if name not in PIPELINES:
        raise KeyError(f"pipeline.name = {name!r} has no launcher; registered: {', '.join(PIPELINES)}")
    module, _, fn = PIPELINES[name].partition(":")
    return getattr(importlib.import_module(module), fn)


__all__ = ["PIPELINES", "get_pipeline", "launch_training"]
