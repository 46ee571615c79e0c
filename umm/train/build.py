"""The model a run trains, built without ever holding it whole: meta device → recipe (freezing,
LoRA) → checkpointing, compile, FSDP2 (umm/train/parallel.py) → each rank materialises its own
shards from the weights (umm/train/materialize.py).

Weights come from, in order: the run's checkpoint being resumed (its trained tensors; the frozen
ones from where the run started), else ``method.init_from`` (EMA or raw weights), else the model dir.
All three take the same path.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, List, Optional

import torch
from torch import nn

from umm.config.schema import RootConfig
from umm.model.io import build_on_meta, layer_index, load_ae, load_tokenizer, read_model_dims, weights_path
from umm.train import parallel
from umm.train.compiling import prepare_compile
from umm.train.distributed import DistEnv
from umm.train.materialize import WeightFile, materialize
from umm.train.memory_plan import checkpointing_share
from umm.train.state_dict import ADAPTER_DIRS, is_adapter_key, upstream_key


@dataclass
class BuiltModel:
    model: nn.Module  # what trains: the Bagel, or its peft wrapper; sharded under torchrun
    bagel: nn.Module
    ae: Any
    tokenizer: Any
    recompute_share: float  # of the LLM's layers (umm/config/recompute.py): auto's choice resolved


def weight_files(cfg: RootConfig, resume_from: Optional[Path], num_layers: int) -> List[WeightFile]:
    """Where each tensor comes from: base weights under upstream names, adapters under training names.
    A resume reads the trained tensors from the ranks' shards (whatever world size wrote them) and
    the frozen ones from where the run first read them (they never change)."""
    base = base_weight_files(cfg, num_layers)
    if resume_from is None:
        return base
    from umm.train.checkpoint import read_meta
    from umm.train.sharded_state import open_checkpoint

    trained = set(read_meta(resume_from).get("trainable", []))
    in_shards = {f"model/{n}" for n in trained}
    shards = WeightFile(resume_from / "state", lambda name: f"model/{name}" if name in trained else None,
                        lambda k: k in in_shards, open=lambda _: open_checkpoint(resume_from))
    # Checkpoints written before only trained tensors were saved hold all of them; they are read the same.
    trained_upstream = {upstream_key(n) for n in trained}
    return [shards, *(dataclasses.replace(wf, keep=lambda k, keep=wf.keep: keep(k) and k not in trained_upstream)
                      for wf in base)]


def base_weight_files(cfg: RootConfig, num_layers: int, model_dir: Optional[Path] = None) -> List[WeightFile]:
    """The weights a run starts from: ``method.init_from`` (EMA or raw weights), else the model dir
    (``model_dir``, default ``model.path``)."""
    def base(name: str) -> Optional[str]:
        return None if is_adapter_key(name) else upstream_key(name)

    if cfg.method.init_from:
        from umm.train.checkpoint import CheckpointError, read_meta, resolve_init_from
        from umm.train.checkpoint_integrity import check_loadable

        source = resolve_init_from(cfg.method.init_from)
        weights = source / ("ema.safetensors" if cfg.method.init_from_ema else "model.safetensors")
        if not weights.is_file() and (source / ADAPTER_DIRS["raw"]).is_dir():
            raise CheckpointError(f"method.init_from={source}: a LoRA run's checkpoint holds its adapters, not "
                                  f"full weights; merge them with `umm export {source} <dir>` and start from "
                                  f"model.path=<dir>")
        if cfg.method.init_from_ema and not weights.is_file() and read_meta(source).get("ema") is False:
            raise CheckpointError(f"method.init_from={source}: that run kept no EMA (train.ema_decay=null); "
                                  f"set method.init_from_ema=false to start from its weights")
        if not weights.is_file() and read_meta(source).get("consolidated") is False:
            raise CheckpointError(f"method.init_from={source}: that checkpoint holds only resume shards (no "
                                  f"{weights.name}); point it at the run's final checkpoint (or one written at "
                                  f"train.export_every steps)")
        check_loadable(weights, "method.init_from")
        return [WeightFile(weights, base)]
    # A cut LLM (benchmarks, tests) skips the layers it does not build.
    keep = lambda k: (layer_index(k) is None) or layer_index(k) < num_layers  # noqa: E731
    return [WeightFile(weights_path(model_dir or cfg.model.path, cfg.model.weights), base, keep)]


def frozen_to_compute_dtype(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> None:
    """Frozen parameters are only ever read in the compute dtype, so they load in it (half the memory
    of fp32; lossless for the released bf16 weights). Fixed position tables stay fp32, as upstream."""
    for name, p in model.named_parameters():
        if not p.requires_grad and not name.endswith("pos_embed.pos_embed"):
            p.data = p.data.to(dtype)


def _untimed(name: str) -> ContextManager:
    return contextlib.nullcontext()


def build_model(cfg: RootConfig, env: DistEnv, recipe, resume_from: Optional[Path],
                phase: Callable[[str], ContextManager] = _untimed) -> BuiltModel:
    """``phase(name)`` times each part, for the trainer's startup breakdown: model_build (on meta, with
    the recipe's changes), model_wrap (checkpointing, compile and FSDP2 wrapping), model_weights (read
    and placed), model_rest (the autoencoder and the tokenizer)."""
    with phase("model_build"):
        bagel, model, dims = _build_on_meta(cfg, recipe)
    share = checkpointing_share(cfg)
    with phase("model_wrap"):
        model = parallel.prepare(
            model, env, ac=share,
            compile=prepare_compile(cfg.train, env.device),
            param_dtype=torch.bfloat16 if cfg.train.precision == "bf16" else None,
        )
    with phase("model_weights"):
        files = weight_files(cfg, resume_from, dims.llm.num_hidden_layers)
        materialize(model, files, env.device, seed=cfg.train.seed)
        bagel.language_model.model.rotary_emb.reset_parameters(env.device)  # not in any checkpoint
    with phase("model_rest"):
        ae = load_ae(cfg.model.path, device=env.device).eval().requires_grad_(False)
        tokenizer = load_tokenizer(cfg.model.path)
    return BuiltModel(model=model, bagel=bagel, ae=ae, tokenizer=tokenizer, recompute_share=share)


def _build_on_meta(cfg: RootConfig, recipe):
    dims = read_model_dims(cfg.model.path, cfg.model.num_layers)
    # The recipe's shift (IRG trains at 4), not the model dir's: upstream passes it as a training flag.
    dims.bagel.timestep_shift = cfg.model.timestep_shift
    bagel = build_on_meta(dims)
    bagel.attn_backend = cfg.train.attn_backend
    bagel.flex_pad_to = cfg.data.max_num_tokens  # one block-mask shape for every pack: no flex recompiles
    with torch.device("meta"):  # LoRA adapters too: peft would allocate them on the host first
        model = recipe.prepare_model(bagel)
    if cfg.train.precision == "bf16":
        frozen_to_compute_dtype(model)
    return bagel, model, dims
