"""Memory plan before loading: expected per-GPU and per-node host memory of a run, and the levers
that would make it fit when it does not.

Counts are exact per part, from the dims alone (:func:`bagel_shapes`; LoRA adapters from the
targets' widths), so a dry run plans without importing torch. Per GPU, with N ranks sharing every sharded tensor (FSDP2 when N > 1):
- trainable: 16 B/param / N (bf16 weight + fp32 master + bf16 grad + AdamW moments, or fp32
  weight + fp32 grad + moments: both 16), the fp32 EMA 4 B/param / N unless it lives in host memory (or the run keeps none);
- frozen parts in the compute dtype (bf16: 2 B/param; fp32 runs 4) / N; the fp32 autoencoder whole;
- under FSDP2 the root unit (embeddings, lm_head, ViT, heads) gathered in bf16 for the whole step,
  its bf16 gradients, and two gathered LLM layers (current + prefetched);
- activations of the token budget (``data.max_num_tokens`` per micro-batch) for compiled MoT layers:
  without checkpointing 2 B x (3 x intermediate + 7 x hidden) per token and layer; with it 2 B x
  hidden per token and layer plus one layer's full activations during recompute.
The constants were checked against the measured bench rows (BENCHMARKS.md, "memory plan vs measured").
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from umm.errors import UmmError
from umm.config import recompute

GIB = 2**30
HOST_PER_RANK_GIB = 3.0  # a rank's process: CUDA context, torch and library code, data workers
# The share of a GPU that activation_checkpointing=auto plans to fill: the plan came within 2 % of
# measured peaks, and leaves out the allocator's fragmentation and kernels' workspaces.
AUTO_FILL = 0.9


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
    activation_checkpointing: float  # the share of LLM layers recomputed (umm/config/recompute.py)
    ema_on_gpu: bool
    frozen_bytes: int = 2  # frozen parts in the compute dtype (umm/train/build.py)
    ema: bool = True  # False: train.ema_decay null keeps no EMA anywhere (UniCoT's LoRA)
    lora: bool = False  # the counts are LoRA adapters over a frozen base
    async_save: bool = False  # train.async_save: each rank keeps a host copy of its checkpoint shard


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
        "EMA": 4 * c.trainable / n if p.ema and p.ema_on_gpu else 0.0,
        "frozen": p.frozen_bytes * c.frozen / n,
        "autoencoder": 4 * c.ae,
    }
    if n > 1:
        parts["gathered (FSDP2)"] = 2 * c.root + 2 * c.root_trainable + 2 * 2 * c.layer
    per_layer_full = 2 * (3 * c.intermediate + 7 * c.hidden) * p.tokens
    # A checkpointed layer keeps its input; the one being recomputed holds its full activations.
    recomputed = len(recompute.recomputed(c.layers, p.activation_checkpointing))
    parts["activations"] = (2 * c.hidden * p.tokens * recomputed + per_layer_full * (c.layers - recomputed)
                            + (per_layer_full if recomputed else 0))
    gpu = sum(parts.values())
    # Host: each rank's process, plus the host EMA (fp32 shadow + pinned staging copy) when it is there.
    # With train.async_save, the host copy of the rank's shard: fp32 masters and AdamW moments, and the EMA.
    host = p.nproc_per_node * (HOST_PER_RANK_GIB * GIB + (0 if p.ema_on_gpu or not p.ema else 8 * c.trainable / n)
                               + ((16 if p.ema else 12) * c.trainable / n if p.async_save else 0))
    # Rank 0 at a save: LoRA's adapters, gathered whole (measured at 7B: 4.3 GiB over the process), and
    # their EMA (copied once more for a background write). A full run's consolidated files are gathered
    # one tensor at a time (umm/train/consolidate.py).
    if p.lora:
        host += (4 + p.ema * (8 if p.async_save else 4)) * c.trainable
    return Plan(gpu / GIB, host / GIB, {k: v / GIB for k, v in parts.items()})


def bagel_shapes(dims) -> Dict[str, Tuple[int, ...]]:
    """Parameter shapes of a Bagel with one LLM and one ViT layer (``layers.0``), from its dims alone:
    dry runs plan without building anything (tests check them against the module itself)."""
    llm, vit, bc = dims.llm, dims.vit, dims.bagel
    h, inter, hd = llm.hidden_size, llm.intermediate_size, llm.hidden_size // llm.num_attention_heads
    kv = llm.num_key_value_heads * hd
    shapes: Dict[str, Tuple[int, ...]] = {"language_model.model.embed_tokens.weight": (llm.vocab_size, h)}
    lay = "language_model.model.layers.0."
    for g in ("", "_moe_gen"):
        for proj, out in (("q", h), ("k", kv), ("v", kv)):
            shapes[f"{lay}self_attn.{proj}_proj{g}.weight"] = (out, h)
            shapes[f"{lay}self_attn.{proj}_proj{g}.bias"] = (out,)
        shapes[f"{lay}self_attn.o_proj{g}.weight"] = (h, h)
        shapes[f"{lay}self_attn.q_norm{g}.weight"] = shapes[f"{lay}self_attn.k_norm{g}.weight"] = (hd,)
        shapes[f"{lay}mlp{g}.gate_proj.weight"] = shapes[f"{lay}mlp{g}.up_proj.weight"] = (inter, h)
        shapes[f"{lay}mlp{g}.down_proj.weight"] = (h, inter)
        shapes[f"{lay}input_layernorm{g}.weight"] = shapes[f"{lay}post_attention_layernorm{g}.weight"] = (h,)
        shapes[f"language_model.model.norm{g}.weight"] = (h,)
    shapes["language_model.lm_head.weight"] = (llm.vocab_size, h)
    latent = bc.latent_token_dim
    shapes.update({"time_embedder.mlp.0.weight": (h, 256), "time_embedder.mlp.0.bias": (h,),
                   "time_embedder.mlp.2.weight": (h, h), "time_embedder.mlp.2.bias": (h,),
                   "vae2llm.weight": (h, latent), "vae2llm.bias": (h,),
                   "llm2vae.weight": (latent, h), "llm2vae.bias": (latent,),
                   "latent_pos_embed.pos_embed": (bc.max_latent_size**2, h)})
    v, vi, side = vit.hidden_size, vit.intermediate_size, bc.vit_max_num_patch_per_side
    pre = "vit_model.vision_model."
    shapes[pre + "embeddings.patch_embedding.weight"] = (v, vit.num_channels * vit.patch_size**2)
    shapes[pre + "embeddings.patch_embedding.bias"] = (v,)
    shapes[pre + "embeddings.position_embedding.weight"] = (side**2, v)
    vl = pre + "encoder.layers.0."
    for name, shape in (("layer_norm1", (v,)), ("self_attn.q_proj", (v, v)), ("self_attn.k_proj", (v, v)),
                        ("self_attn.v_proj", (v, v)), ("self_attn.out_proj", (v, v)), ("layer_norm2", (v,)),
                        ("mlp.fc1", (vi, v)), ("mlp.fc2", (v, vi))):
        shapes[f"{vl}{name}.weight"] = shape
        shapes[f"{vl}{name}.bias"] = (shape[0],)
    shapes[pre + "post_layernorm.weight"] = shapes[pre + "post_layernorm.bias"] = (v,)
    shapes.update({"connector.fc1.weight": (h, v), "connector.fc1.bias": (h,),
                   "connector.fc2.weight": (h, h), "connector.fc2.bias": (h,),
                   "vit_pos_embed.pos_embed": (side**2, h)})
    return shapes


def count_model(dims, trainable_parts, lora=None) -> ModelCounts:
    """Parameter counts per role in the plan, exact (:func:`bagel_shapes`, each layer multiplied out)."""
    from umm.model.parts import part_of

    llm_layers, vit_layers = dims.llm.num_hidden_layers, dims.vit_num_layers
    targets = tuple(lora.target_modules) if lora is not None else ()

    def times(name: str) -> int:
        if ".layers.0." not in name:
            return 1
        return vit_layers if name.startswith("vit_model.") else llm_layers

    trainable = frozen = root = root_trainable = layer = 0
    for name, shape in bagel_shapes(dims).items():
        numel = math.prod(shape)
        count = numel * times(name)
        train = part_of(name) in trainable_parts and not name.endswith("pos_embed.pos_embed") and lora is None
        trainable += count if train else 0
        frozen += 0 if train else count
        if name.startswith("language_model.model.layers."):
            layer += numel
        else:
            root += count
            root_trainable += count if train else 0
        module = name.rsplit(".", 2)
        if len(shape) == 2 and name.endswith(".weight") and module[-2] in targets:
            trainable += lora.r * (shape[0] + shape[1]) * times(name)  # LoRA A [r, in] and B [out, r]
    return ModelCounts(trainable=trainable, frozen=frozen, root=root, root_trainable=root_trainable, layer=layer,
                       ae=0, hidden=dims.llm.hidden_size, intermediate=dims.llm.intermediate_size,
                       layers=llm_layers)


def header_params(path: Path) -> int:
    """Parameters in a safetensors file, from its header alone."""
    from umm.train.safetensors_file import read_header

    _, header = read_header(path, "copy the model dir again")
    return sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")


def inputs_from_config(cfg) -> PlanInputs:
    """The plan's inputs for a resolved run config: dims from the model dir's configs when it exists,
    else from the config's build dims; the autoencoder from its file's header (not counted without one)."""
    from umm.config.schema import AEBuildConfig
    from umm.methods import DEFAULT_TRAINABLE
    from umm.model.config import dims_from_build_config, read_dims

    model_dir = Path(cfg.model.path)
    if (model_dir / "llm_config.json").is_file():
        ae_json = model_dir / "ae_config.json"
        try:
            raw = json.loads(ae_json.read_text()) if ae_json.is_file() else {}
        except ValueError as e:
            raise MemoryPlanError(f"{ae_json} is not valid JSON ({e}); copy the model dir again") from None
        ae = AEBuildConfig(**{k: v for k, v in raw.items() if k in AEBuildConfig.__dataclass_fields__})
        dims = read_dims(model_dir, ae_latent_channels=ae.z_channels, ae_downsample=2 ** (len(ae.ch_mult) - 1))
    else:
        dims = dims_from_build_config(cfg.model)
    if cfg.model.num_layers is not None:
        dims.llm.num_hidden_layers = cfg.model.num_layers
    # What trains, as the recipe decides (umm/methods), read without importing torch.
    lora = cfg.method.lora if cfg.method.lora.enabled and cfg.method.recipe == "unicot" else None
    parts = set() if lora else set(cfg.method.trainable or DEFAULT_TRAINABLE[cfg.method.recipe])
    counts = count_model(dims, parts, lora)
    ae_file = model_dir / "ae.safetensors"
    counts = replace(counts, ae=header_params(ae_file) if ae_file.is_file() else 0)
    nproc = cfg.torchrun.nproc_per_node
    setting = cfg.train.activation_checkpointing
    inputs = PlanInputs(counts=counts, world_size=nproc * cfg.torchrun.nnodes, nproc_per_node=nproc,
                        tokens=cfg.data.max_num_tokens,
                        activation_checkpointing=1.0 if setting == "auto" else recompute.fraction(setting),
                        ema_on_gpu=not cfg.train.ema_on_cpu, frozen_bytes=2 if cfg.train.precision == "bf16" else 4,
                        ema=cfg.train.ema_decay is not None, lora=lora is not None, async_save=cfg.train.async_save)
    if setting == "auto":
        gpu = visible_gpu_gib(cfg)
        inputs = replace(inputs, activation_checkpointing=0.0 if gpu is None else fewest_recomputed(inputs, gpu))
    return inputs


def fewest_recomputed(p: PlanInputs, gpu_gib: float) -> float:
    """``train.activation_checkpointing=auto``: the smallest share of LLM layers recomputed whose plan fits
    :data:`AUTO_FILL` of the GPU (every layer when none does; :func:`check` then names the levers)."""
    for k in range(p.counts.layers + 1):
        share = k / max(1, p.counts.layers)
        if estimate(replace(p, activation_checkpointing=share)).gpu_gib <= AUTO_FILL * gpu_gib:
            return share
    return 1.0


def checkpointing_share(cfg) -> float:
    """The share of LLM blocks this run recomputes (umm/config/recompute.py): the setting's, or auto's choice."""
    setting = cfg.train.activation_checkpointing
    return inputs_from_config(cfg).activation_checkpointing if setting == "auto" else recompute.fraction(setting)


def visible_gpu_gib(cfg) -> Optional[float]:
    """``train.gpu_memory_gib``, else the first visible GPU's memory; None on CPU runs without it."""
    if cfg.train.gpu_memory_gib is not None:
        return float(cfg.train.gpu_memory_gib)
    if cfg.train.device == "cpu" or not any(Path(p).exists() for p in ("/dev/nvidiactl", "/dev/kfd")):
        return None  # no GPU driver: no need to import torch (dry runs stay fast)
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory / GIB
    return None


def describe_share(layers: int, share: float) -> str:
    """A recompute share of the LLM's layers in words, for the start of a run."""
    return f"{len(recompute.recomputed(layers, share))} of {layers} LLM layers recompute (share {share:.3g})"


def levers(p: PlanInputs, gpu_gib: float) -> List[str]:
    """What would make it fit, each with the estimate it gives (the cheapest kinds first)."""
    out = []
    for n in (2, 4, 8, 16, 32, 64):
        if n > p.world_size and estimate(replace(p, world_size=n)).gpu_gib <= gpu_gib:
            out.append(f"{n} GPUs in all (torchrun.nproc_per_node x nnodes)")
            break
    if p.ema and p.ema_on_gpu:
        out.append(f"EMA in host memory: train.ema_on_cpu=true ({estimate(replace(p, ema_on_gpu=False)).gpu_gib:.0f} GiB)")
    if p.activation_checkpointing < 1:
        out.append("activation checkpointing of every block: train.activation_checkpointing=true "
                   f"({estimate(replace(p, activation_checkpointing=1.0)).gpu_gib:.0f} GiB)")
    if not p.lora:
        out.append("LoRA: method.lora.enabled=true (pipeline=unicot)")
    for tokens in (p.tokens // 2, p.tokens // 4):
        if tokens and estimate(replace(p, tokens=tokens)).gpu_gib <= gpu_gib:
            out.append(f"a smaller token budget: data.max_num_tokens={tokens}")
            break
    return out


def check(cfg, out=print) -> Plan:
    """Print the plan (dry runs, GPU runs); raise one line with the levers when it cannot fit the visible GPUs."""
    inputs = inputs_from_config(cfg)
    plan = estimate(inputs)
    gpu = visible_gpu_gib(cfg)
    if gpu is None and not cfg.dry_run:
        return plan  # a run on the CPU: GPU memory means nothing to it
    out(f"# memory plan ({inputs.world_size} GPU(s), {inputs.counts.trainable / 1e9:.2f} B trainable "
        f"and {inputs.counts.frozen / 1e9:.2f} B frozen parameters, {inputs.tokens} tokens per micro-batch): "
        f"{plan.line()}")
    if cfg.train.activation_checkpointing == "auto":
        gpu_note = "" if gpu is not None else " (no GPU visible; train.gpu_memory_gib=<GiB> plans for one)"
        out(f"# activation checkpointing auto: {describe_share(inputs.counts.layers, inputs.activation_checkpointing)}{gpu_note}")
    if gpu is not None and plan.gpu_gib > gpu:
        raise MemoryPlanError(
            f"the run needs about {plan.gpu_gib:.0f} GiB per GPU, the GPUs have {gpu:.0f} GiB; levers: "
            + ("; ".join(levers(inputs, gpu)) or "none of umm's settings brings it under that")
            + " (train.gpu_memory_gib overrides the visible GPU memory)"
        )
    return plan
