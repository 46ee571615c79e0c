"""Whether the trainer compiles its blocks (``train.compile``), where the compiled kernels are kept,
and what dynamo counted (graphs, recompiles, cache hits) for the run's log.

A cold compile of the 4-layer slice took minutes on an H100 and a warm one (inductor's caches on
disk) seconds (benchmarks/h100_2026-12-06_first_step.jsonl), so the cache lives under the output
root by default, where a resume or the next run finds it, rather than in /tmp.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, MutableMapping, Optional

import torch

from umm.config.schema import TrainConfig

CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"  # inductor's FX graph, autotuning and Triton caches live under it


def compiles(setting, device: torch.device) -> bool:
    """``train.compile``: auto compiles on CUDA only (a CPU compile of even the tiny model takes minutes)."""
    return device.type == "cuda" if setting == "auto" else bool(setting)


def use_compile_cache(cache_dir: Optional[str], environ: MutableMapping[str, str] = os.environ) -> Optional[str]:
    """Point inductor's cache at ``cache_dir`` unless the user chose one (or null keeps torch's);
    returns the directory in use, if set. Must run before the first compile: inductor reads it then."""
    if cache_dir is not None and CACHE_ENV not in environ:
        environ[CACHE_ENV] = str(Path(cache_dir).absolute())  # every rank: one absolute path
    return environ.get(CACHE_ENV)


def prepare_compile(train: TrainConfig, device: torch.device) -> bool:
    """Whether this run compiles its blocks. The cache directory is set first whenever anything
    compiles: on CUDA that is always, since flex attention is compiled even with ``train.compile=false``
    (its kernels took 200 of the 240 s to the first step of an uncompiled 7B run on an H200)."""
    on = compiles(train.compile, device)
    if on or device.type == "cuda":
        use_compile_cache(train.compile_cache_dir)
    return on


def compile_counts() -> Dict[str, float]:
    """Dynamo's graphs and recompiles so far in this process, inductor's FX graph cache hits and
    misses (hits on a warm start), and the seconds spent compiling forwards and (lazily, at their
    first run) backwards: what of the time to the first step was compiling. Recompiles are the
    compiles that carry a reason (dynamo keeps the last 64 records; ``compile_frames`` counts all)."""
    from torch._dynamo.utils import compilation_time_metrics, counters, get_compilation_metrics

    return {
        "compile_fwd_s": sum(compilation_time_metrics.get("_compile.compile_inner", ())),
        "compile_bwd_s": sum(compilation_time_metrics.get("backward._backward_impl", ())),
        "compile_graphs": counters["stats"]["unique_graphs"],
        "compile_frames": counters["frames"]["total"],
        "compile_recompiles": sum(m.recompile_reason is not None for m in get_compilation_metrics()),
        "compile_cache_hits": counters["inductor"]["fxgraph_cache_hit"],
        "compile_cache_misses": counters["inductor"]["fxgraph_cache_miss"],
    }
