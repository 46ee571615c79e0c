"""argv for ``python -m torch.distributed.run`` from the ``torchrun`` config group."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List

from umm.config.schema import RootConfig, TorchrunConfig

WORKER_MODULE = "umm.train.worker"


def torchrun_flags(t: TorchrunConfig, *, default_rdzv_id: str) -> List[str]:
    flags = ["--nnodes", str(t.nnodes), "--nproc-per-node", str(t.nproc_per_node), "--node-rank", str(t.node_rank)]
    if t.standalone:
        # torchrun picks a free port itself: parallel runs on one machine never clash.
        flags.append("--standalone")
    else:
        flags += ["--rdzv-backend", t.rdzv_backend, "--rdzv-endpoint", str(t.rdzv_endpoint),
                  "--rdzv-id", str(t.rdzv_id or default_rdzv_id)]
    flags += ["--max-restarts", str(t.max_restarts), *t.extra_args]
    return flags


def torchrun_prefix(cfg: RootConfig, t: TorchrunConfig | None = None) -> List[str]:
    return [sys.executable, "-m", "torch.distributed.run", *torchrun_flags(t or cfg.torchrun, default_rdzv_id=cfg.run_name)]


def resolved_path(cfg: RootConfig) -> str:
    return str(Path(cfg.run_dir).absolute() / "resolved.yaml")


def worker_argv(cfg: RootConfig, t: TorchrunConfig | None = None) -> List[str]:
    """Every rank runs the worker on the run's resolved.yaml (no Hydra on the ranks)."""
    return [*torchrun_prefix(cfg, t), "-m", WORKER_MODULE, resolved_path(cfg)]


def inprocess_equivalent(cfg: RootConfig) -> List[str]:
    """The command that does what the in-process launcher does (shown by dry runs)."""
    return [sys.executable, "-m", WORKER_MODULE, resolved_path(cfg)]
