"""One process: the trainer runs in the app's own process (same code path as a torchrun rank)."""
from __future__ import annotations

from umm.config.schema import RootConfig


def run_inprocess(cfg: RootConfig) -> dict:
    from umm.train.worker import run

    return run(cfg)
