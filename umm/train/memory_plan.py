"""Memory plan before loading: expected per-GPU and per-node host memory of a run, and the levers
that would make it fit when it does not.

Counts come from the model built on the meta device (exact per part; LoRA adapters from the
targets' widths). Per GPU, with N ranks sharing every sharded tensor (FSDP2 when N > 1):
- trainable: 16 B/param / N (bf16 weight + fp32 master + bf16 grad + AdamW moments, or fp32
  weight + fp32 grad + moments: both 16), the fp32 EMA 4 B/param / N unless it lives in host memory;
- frozen parts in the compute dtype (bf16: 2 B/param; fp32 runs 4) / N; the fp32 autoencoder whole;
- under FSDP2 the root unit (embeddings, lm_head, ViT, heads) gathered in bf16 for the whole step,
  its bf16 gradients, and two gathered LLM layers (current + prefetched);
- activations of the token budget (``data.max_num_tokens`` per micro-batch) for compiled MoT layers:
  without checkpointing 2 B x (3 x intermediate + 7 x hidden) per token and layer; with it 2 B x
  hidden per token and layer plus one layer's full activations during recompute.
The constants were checked against the measured bench rows (BENCHMARKS.md, "memory plan vs measured").
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional

import torch

from umm.errors import UmmError

GIB = 2**30
HOST_PER_RANK_GIB = 3.0  # a rank's process: CUDA context, torch and library code, data workers


class MemoryPlanError(UmmError, RuntimeError):
    """The run cannot fit the GPUs it is given."""


@dataclass(frozen=True)
class ModelCounts:
    trainable: int
    frozen: int
    root: int  # parameters outside the LLM decoder layers (FSDP2's root unit)
    root_trainable: int
    layer: int  # one LLM decoder layer
    ae: int
    hidden: int
    intermediate: int
    layers: int


@dataclass(frozen=True)
class PlanInputs:
    counts: ModelCounts
    world_size: int
    nproc_per_node: int
    tokens: int  # per micro-batch and GPU
    activation_checkpointing: bool
    ema_on_gpu: bool
    frozen_bytes: int = 2  # frozen parts in the compute dtype (umm/train/build.py)


@dataclass(frozen=True)
class Plan:
    gpu_gib: float
    host_node_gib: float
    parts: Dict[str, float]  # GiB per GPU by component

    def line(self) -> str:
        split = ", ".join(f"{k} {v:.1f}" for k, v in self.parts.items() if v >= 0.05)
        return f"per GPU {self.gpu_gib:.1f} GiB ({split}); host per node {self.host_node_gib:.1f} GiB"


def estimate(p: PlanInputs) -> Plan:
    c, n = p.counts, p.world_size
    parts = {
        "weights+grads+AdamW": 16 * c.trainable / n,
        "EMA": 4 * c.trainable / n if p.ema_on_gpu else 0.0,
        "frozen": p.frozen_bytes * c.frozen / n,
        "autoencoder": 4 * c.ae,
    }
    if n > 1:
        parts["gathered (FSDP2)"] = 2 * c.root + 2 * c.root_trainable + 2 * 2 * c.layer
    per_layer_full = 2 * (3 * c.intermediate + 7 * c.hidden) * p.tokens
    if p.activation_checkpointing:
        parts["activations"] = 2 * c.hidden * p.tokens * c.layers + per_layer_full
    else:
        parts["activations"] = per_layer_full * c.layers
    gpu = sum(parts.values())
    # Host: each rank's process, plus the host EMA (fp32 shadow + pinned staging copy) when it is there.
    host = p.nproc_per_node * (HOST_PER_RANK_GIB * GIB + (0 if p.ema_on_gpu else 8 * c.trainable / n))
    return Plan(gpu / GIB, host / GIB, {k: v / GIB for k, v in parts.items()})


def count_model(dims, trainable_parts, lora=None) -> ModelCounts:
    """Parameter counts per role in the plan, exact: a Bagel with one LLM and one ViT layer is built on
    the meta device (no memory, and fast at any depth) and each layer's count is multiplied out."""
    from umm.model.io import build_on_meta
    from umm.model.parts import part_of

    llm_layers, vit_layers = dims.llm.num_hidden_layers, dims.vit_num_layers
    one = copy.deepcopy(dims)
    one.llm.num_hidden_layers = 1
    one.vit.num_hidden_layers -= vit_layers - 1
    model = build_on_meta(one)

    def times(name: str) -> int:
        if ".layers.0." not in name:
            return 1
        return vit_layers if name.startswith("vit_model.") else llm_layers

    trainable = frozen = root = root_trainable = layer = 0
    for name, prm in model.named_parameters():
        count = prm.numel() * times(name)
        train = part_of(name) in trainable_parts and not name.endswith("pos_embed.pos_embed") and lora is None
        trainable += count if train else 0
        frozen += 0 if train else count
        if name.startswith("language_model.model.layers."):
            layer += prm.numel()
        else:
            root += count
            root_trainable += count if train else 0
    if lora is not None:
        targets = tuple(lora.target_modules)
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and name.split(".")[-1] in targets:
                trainable += lora.r * (mod.in_features + mod.out_features) * times(name + ".")
    return ModelCounts(trainable=trainable, frozen=frozen, root=root, root_trainable=root_trainable, layer=layer,
                       ae=0, hidden=dims.llm.hidden_size, intermediate=dims.llm.intermediate_size,
                       layers=llm_layers)


def ae_params(ae_cfg) -> int:
    from umm.model.autoencoder import AutoEncoder

    with torch.device("meta"):
        return sum(p.numel() for p in AutoEncoder(ae_cfg).parameters())


def inputs_from_config(cfg) -> PlanInputs:
    """The plan's inputs for a resolved run config (dims from the model dir's configs when it exists,
    else from the config's build dims)."""
    from umm.methods import get_recipe
    from umm.model.config import dims_from_build_config
    from umm.model.io import read_ae_params, read_model_dims

    model_dir = Path(cfg.model.path)
    if (model_dir / "llm_config.json").is_file():
        dims, ae_cfg = read_model_dims(model_dir, cfg.model.num_layers), read_ae_params(model_dir)
    else:
        dims, ae_cfg = dims_from_build_config(cfg.model), cfg.model.ae
        if cfg.model.num_layers is not None:
            dims.llm.num_hidden_layers = cfg.model.num_layers
    recipe = get_recipe(cfg.method)
    counts = count_model(dims, recipe.trainable_parts(), cfg.method.lora if cfg.method.lora.enabled else None)
    counts = replace(counts, ae=ae_params(ae_cfg))
    nproc = cfg.torchrun.nproc_per_node
    return PlanInputs(counts=counts, world_size=nproc * cfg.torchrun.nnodes, nproc_per_node=nproc,
                      tokens=cfg.data.max_num_tokens, activation_checkpointing=cfg.train.activation_checkpointing,
                      ema_on_gpu=not cfg.train.ema_on_cpu, frozen_bytes=2 if cfg.train.precision == "bf16" else 4)


def visible_gpu_gib(cfg) -> Optional[float]:
    """``train.gpu_memory_gib``, else the first visible GPU's memory; None on CPU runs without it."""
    if cfg.train.gpu_memory_gib is not None:
        return float(cfg.train.gpu_memory_gib)
    if cfg.train.device != "cpu" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory / GIB
    return None


def levers(p: PlanInputs, gpu_gib: float) -> List[str]:
    """What would make it fit, each with the estimate it gives (the cheapest kinds first)."""
    out = []
    for n in (2, 4, 8, 16, 32, 64):
        if n > p.world_size and estimate(replace(p, world_size=n)).gpu_gib <= gpu_gib:
            out.append(f"{n} GPUs in all (torchrun.nproc_per_node x nnodes)")
            break
    if p.ema_on_gpu:
        out.append(f"EMA in host memory: train.ema_on_cpu=true ({estimate(replace(p, ema_on_gpu=False)).gpu_gib:.0f} GiB)")
    if not p.activation_checkpointing:
        out.append("activation checkpointing: train.activation_checkpointing=true "
                   f"({estimate(replace(p, activation_checkpointing=True)).gpu_gib:.0f} GiB)")
    out.append("LoRA: method.lora.enabled=true (pipeline=unicot)")
    for tokens in (p.tokens // 2, p.tokens // 4):
        if tokens and estimate(replace(p, tokens=tokens)).gpu_gib <= gpu_gib:
            out.append(f"a smaller token budget: data.max_num_tokens={tokens}")
            break
    return out


def check(cfg, out=print) -> Plan:
    """Print the plan; raise one line with the levers when it cannot fit the visible GPUs."""
    inputs = inputs_from_config(cfg)
    plan = estimate(inputs)
    gpu = visible_gpu_gib(cfg)
    out(f"# memory plan ({inputs.world_size} GPU(s), {inputs.counts.trainable / 1e9:.2f} B trainable "
        f"and {inputs.counts.frozen / 1e9:.2f} B frozen parameters, {inputs.tokens} tokens per micro-batch): "
        f"{plan.line()}")
    if gpu is not None and plan.gpu_gib > gpu:
        raise MemoryPlanError(
            f"the run needs about {plan.gpu_gib:.0f} GiB per GPU, the GPUs have {gpu:.0f} GiB; levers: "
            + "; ".join(levers(inputs, gpu)) + " (train.gpu_memory_gib overrides the visible GPU memory)"
        )
    return plan
