"""Whether the trainer compiles its blocks (``train.compile``), where the compiled kernels are kept,
and what dynamo counted (graphs, recompiles, cache hits) for the run's log.

A cold compile of the 4-layer slice took minutes on an H100 and a warm one (inductor's caches on
disk) seconds (benchmarks/h100_2026-12-06_first_step.jsonl), so the cache lives under the output
root by default, where a resume or the next run finds it, rather than in /tmp.
"""
from __future__ import annotations

import difflib
import json
import os
import typing
from pathlib import Path
from typing import Any, Dict, Iterator, Mapping, MutableMapping, Optional, Tuple

import torch

from umm.config import ConfigError
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


def default_inductor_options() -> Dict[str, Any]:
    """Inductor settings every compiling run gets unless its own options say otherwise."""
    from torch._inductor import config

    # Inductor fuses a norm backward's two reductions only above 5 Mi elements (rows x width) and
    # guards that choice on the pack's size: packs crossing it recompiled the blocks (ViT and
    # understanding tokens, BENCHMARKS.md). Its non-strict mode chooses without the size (no guard).
    if hasattr(config.triton, "mix_order_reduction_non_strict_mode"):
        return {"triton.mix_order_reduction_non_strict_mode": True}
    return {}


def _flat(options: Mapping[str, Any], known: Mapping[str, Any], prefix: str = "") -> Iterator[Tuple[str, Any]]:
    # ``train.inductor_options.triton.x=1`` on the command line nests; YAML may also say ``triton.x: 1``.
    for key, value in options.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and name not in known:
            yield from _flat(value, known, name + ".")
        else:
            yield name, value


def inductor_options(options: Mapping[str, Any], label: str = "train.inductor_options") -> Dict[str, Any]:
    """``options`` as dotted ``torch._inductor.config`` keys, each checked: a key this torch's inductor
    lacks, or a value of another type than the option's, is a :class:`ConfigError` naming it (with
    ``label``, where the user wrote it)."""
    if not options:
        return {}
    from torch._inductor import config

    known = config.get_config_copy()
    out = {}
    for key, value in _flat(options, known):
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {close[0]}?" if close else "remove it or check its spelling."
            raise ConfigError(f"{label} {key}: torch._inductor.config has no such option (this torch: "
                              f"{torch.__version__}); {hint}")
        default = known[key]
        if isinstance(default, dict) and isinstance(value, Mapping):
            value = {**default, **value}  # a dict-valued option: the entries given, the rest as they were
        declared = _declared_type(config, key, default)
        if not _fits(value, declared):
            raise ConfigError(f"{label} {key}={value!r}: the option holds a value of type "
                              f"{getattr(declared, '__name__', declared)}")
        out[key] = value
    return out


def _declared_type(config, key: str, default: Any):
    # Inductor records each option's type (``int | None`` where a default alone says int); older
    # torches may not: then the default's type.
    entry = getattr(config, "_config", {}).get(key)
    return getattr(entry, "value_type", None) or (type(default) if default is not None else None)


def _fits(value: Any, declared) -> bool:
    if declared is None:
        return True
    if declared is float and type(value) is int:
        return True
    if type(value) is bool and bool not in (typing.get_args(declared) or (declared,)):
        return False  # a flag where a count goes (bool is an int to isinstance)
    try:
        return isinstance(value, declared)
    except TypeError:  # a typing construct isinstance cannot check (Callable[...], List[str])
        return True


def set_inductor_options(checked: Mapping[str, Any]) -> Dict[str, Any]:
    """Apply :func:`default_inductor_options`, then ``checked`` (what :func:`inductor_options` returned),
    to ``torch._inductor.config`` for the rest of the process; returns what was set. Also lets
    AOTAutograd's cache keep graphs that hold a custom autograd Function."""
    import torch._functorch.config
    from torch._inductor import config

    # The decoder block holds one (the expert row permutation, umm/model/qwen2_mot.py), and torch
    # bypasses its AOTAutograd cache for those by default: the block's joint graph was traced again
    # at every start, warm caches or not (3 of the 6.7 s of the tiny model's warm first step on CPU).
    # The Function's forward and backward are traced into the graph, so the cache key holds them.
    torch._functorch.config.autograd_cache_allow_custom_autograd_functions = True
    applied = {**default_inductor_options(), **checked}
    for key, value in applied.items():
        *path, name = key.split(".")
        target = config
        for part in path:
            target = getattr(target, part)
        setattr(target, name, value)
    return applied


def prepare_compile(train: TrainConfig, device: torch.device) -> bool:
    """Whether this run compiles its blocks. The cache directory and inductor's options
    (``train.inductor_options``) are set first whenever anything compiles: on CUDA that is always,
    since flex attention is compiled even with ``train.compile=false`` (its kernels took 200 of the
    240 s to the first step of an uncompiled 7B run on an H200)."""
    options = inductor_options(train.inductor_options)  # checked also where nothing compiles
    on = compiles(train.compile, device)
    if on or device.type == "cuda":
        use_compile_cache(train.compile_cache_dir)
        set_inductor_options(options)
    return on


def slowest_kernel_compiles(n: int = 10) -> Dict[str, float]:
    """The Triton kernels whose compile took longest in this process (each with its autotuning
    variants, timed in inductor's compile worker), in seconds, slowest first: where a cold start's
    minutes go. No worker pool can start the first step before its slowest kernel is built. Read
    from dynamo's compile records (the 25 slowest of each compile); empty where nothing compiled
    Triton (CPU) or the record lacks them."""
    from torch._dynamo.utils import get_compilation_metrics

    seconds: Dict[str, float] = {}
    for record in get_compilation_metrics():
        text = getattr(record, "triton_kernel_compile_times_us", None)
        try:  # torch writes "<unknown>" when it cannot; a diagnostic must not stop a run
            entries = [(str(name), float(us)) for name, us in json.loads(text)] if text else []
        except (ValueError, TypeError):
            continue
        # Kernel names are numbered per graph: the compile's id tells the ViT's, the decoder's and
        # each backward's apart.
        graph = getattr(record, "compile_id", None)
        for name, us in entries:
            key = f"[{graph}] {name}" if graph else name
            seconds[key] = max(seconds.get(key, 0.0), round(us / 1e6, 2))
    return dict(sorted(seconds.items(), key=lambda item: -item[1])[:n])


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
