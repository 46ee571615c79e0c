"""Time full training steps of bagel_7b_mot (random weights) on the perf-anchors.md packed batch.

One configuration per process; each run appends one JSON line to ``--out``. A step is forward,
global-token loss, backward, grad-norm clip, fused AdamW and the fp32 EMA, with no host-device
sync inside it; warm-up steps (compile) come first, then ``--steps`` timed steps (CUDA events).
Under torchrun every rank packs its own batch of the same mix (``--batch`` per GPU) and the model
is sharded with FSDP2. MFU follows perf-anchors.md (umm/train/flops.py, 989 TFLOP/s peak).

    python scripts/bench_train.py --layers 4 --vit-layers 4                 # the anchor slice, 1 GPU
    torchrun --nproc-per-node 4 scripts/bench_train.py --layers 4 --vit-layers 4
    python scripts/bench_train.py --layers 28 --vit-layers 26 --lora 256 --ac full --params bf16
    python scripts/bench_train.py --hf-anchor bf16                          # stock transformers Qwen2
    python scripts/bench_train.py --tiny --device cpu --steps 2 --warmup 1  # CPU smoke run
"""
from __future__ import annotations

import time

_PROCESS_START = time.time()  # before torch's import: time to first step counts everything

import argparse
import ast
import json
import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from omegaconf import OmegaConf  # noqa: E402

from umm.config.schema import MethodConfig, ModelConfig, OptimConfig, TrainConfig  # noqa: E402
from umm.model.autoencoder import AutoEncoder  # noqa: E402
from umm.data.packing import PackGeometry, SpecialTokens, pack  # noqa: E402
from umm.data.plan import ImageItem, SamplePlan, TextItem  # noqa: E402
from umm.model.config import BagelConfig, LLMConfig, ModelDims, ViTConfig, dims_from_build_config  # noqa: E402
from umm.model.tiny import tiny_model_config  # noqa: E402
from umm.model.io import build_bagel  # noqa: E402
from umm.train import distributed as D  # noqa: E402
from umm.train import flops as F  # noqa: E402
from umm.config import recompute  # noqa: E402
from umm.train import parallel  # noqa: E402
from umm.train.cpu_ema import AsyncCpuEma  # noqa: E402
from umm.train.compiling import inductor_options, set_inductor_options, slowest_kernel_compiles  # noqa: E402
from umm.train.ema import Ema  # noqa: E402
from umm.train.loss import compute_loss  # noqa: E402
from umm.train.optim import clip_for_step, optimizer_for  # noqa: E402
from umm.train.step_profiler import write_trace  # noqa: E402
from umm.train.step_timeline import StepTimeline  # noqa: E402
from umm.train.worker import exit_now  # noqa: E402

# BAGEL-7B-MoT's special ids (Qwen2 tokenizer): <|im_start|>, <|im_end|>, <|vision_start|>, <|vision_end|>.
SPECIAL_7B = SpecialTokens(bos=151644, eos=151645, vision_start=151652, vision_end=151653)


def ac_share(text: str):
    """--ac: a name of recompute.NAMED as given, or a share of LLM blocks (a float)."""
    if text in recompute.NAMED:
        return text
    try:
        return recompute.fraction(float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: use {', '.join(recompute.NAMED)} or a share in [0, 1]") from None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--layers", type=int, default=4, help="LLM decoder layers (28 = the full model)")
    p.add_argument("--vit-layers", type=int, default=4, help="ViT encoder layers built (26 = the full model)")
    p.add_argument("--tiny", action="store_true", help="tiny widths (CPU smoke runs and tests)")
    p.add_argument("--batch", choices=["anchor", "32k"], default="anchor",
                   help="per-GPU batch: the perf-anchors.md mix (15,873 tokens) or that mix twice (31,746)")
    p.add_argument("--params", choices=["fp32", "bf16"], default="fp32",
                   help="fp32: fp32 master weights, bf16 compute; bf16: pure bf16 weights (and optimizer state)")
    p.add_argument("--master-weights", choices=["auto", "params", "optimizer"], default="auto",
                   help="with --params fp32: where the fp32 master weights live (train.master_weights): params "
                        "(autocast or FSDP2 casts them each step) or optimizer (bf16 parameters); "
                        "auto: optimizer on CUDA")
    p.add_argument("--ac", type=ac_share, default="none",
                   help="activation checkpointing: none, full, every2, or the share of LLM blocks recomputed (0-1; "
                        "the ViT's all recompute once any do)")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--ema", choices=["gpu", "gpu-side", "cpu", "none"], default="gpu",
                   help="gpu: fp32 EMA inside the fused optimizer step; gpu-side: its own pass on a side stream; "
                        "cpu: in host memory")
    p.add_argument("--no-reshard", dest="reshard", action="store_false",
                   help="FSDP2: keep gathered blocks from forward to backward")
    p.add_argument("--fsdp", action="store_true",
                   help="FSDP2 even on one GPU (bf16 weight copies for compute, as upstream's recipe on one GPU)")
    p.add_argument("--lora", type=int, default=0, help="LoRA rank on conf/method/unicot.yaml's targets (0: full FT)")
    p.add_argument("--hf-anchor", choices=["bf16", "fp32_ac"], default=None,
                   help="instead: time stock transformers Qwen2ForCausalLM (perf-anchors.md anchor 1)")
    p.add_argument("--hf-tokens", type=int, default=16384)
    p.add_argument("--vae", action="store_true",
                   help="run the frozen VAE encoder on the batch's images in each step, as the trainer does "
                        "(default: N(0,1) latents, as perf-anchors.md); its time is the phase 'vae'")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--profile", action="store_true", help="one extra profiled step: GPU time by kernel kind")
    p.add_argument("--trace", default=None, metavar="PATH.json.gz",
                   help="one extra step's timeline (host ops with shapes, kernels) for chrome://tracing or Perfetto")
    p.add_argument("--tag", default="", help="label stored with the result")
    p.add_argument("--out", default=None, help="append the result as one JSON line here")
    p.add_argument("--inductor", action="append", default=[], metavar="KEY=VALUE",
                   help="set torch._inductor.config's KEY (dotted, e.g. triton.autotune_pointwise=False: fewer "
                        "kernel variants to compile cold) for this run; repeatable; stored with the result")
    a = p.parse_args(argv)
    try:  # set for the whole run (with umm's defaults), as the trainer's train.inductor_options are
        a.inductor = set_inductor_options(inductor_options(parse_inductor_options(a.inductor), label="--inductor"))
    except ValueError as e:
        p.error(str(e))
    return a


def parse_inductor_options(items) -> dict:
    """``KEY=VALUE`` strings as a dict (VALUE a Python literal, true/false too, else a string); what
    inductor makes of them is checked by :func:`umm.train.compiling.inductor_options`."""
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"--inductor {item!r}: give KEY=VALUE")
        if text.lower() in ("true", "false"):
            out[key] = text.lower() == "true"
            continue
        try:
            out[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            out[key] = text  # a bare word: a string option
    return out


# ---------------------------------------------------------------------------- model and batch


def bench_dims(a) -> ModelDims:
    if a.tiny:
        return ModelDims(
            llm=LLMConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=a.layers, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=1024),
            vit=ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=a.vit_layers + 1,
                          num_attention_heads=2, patch_size=14),
            bagel=BagelConfig(max_latent_size=64, vit_max_num_patch_per_side=70, latent_channels=4),
        )
    cfg = ModelConfig()
    cfg.llm.num_hidden_layers = a.layers
    # vit_config.json states one layer more than is built (vit_select_layer = -2).
    cfg.vit.num_hidden_layers = a.vit_layers + 1
    return dims_from_build_config(cfg)


# perf-anchors.md's mix, in packing order: 5 t2i + 2 edit + 5 und (scripts/bench_app.py weights the
# app's synthetic datasets by it).
ANCHOR_ORDER = ("t2i", "und", "edit", "t2i", "und", "edit", "t2i", "und", "t2i", "und", "t2i", "und")


def anchor_plans(generator: torch.Generator, vocab: int, repeats: int = 1):
    """The samples of :data:`ANCHOR_ORDER` with random text and images."""
    def ids(n):
        return torch.randint(0, min(vocab, 150000) - 16, (n,), generator=generator).tolist()

    def img(side):
        return torch.rand(3, side, side, generator=generator) * 2 - 1

    def t2i():
        return [TextItem(ids(64), enable_cfg=True), ImageItem(img(512), "vae_noised", loss=True)]

    def edit():
        return [ImageItem(img(512), "vae_clean", enable_cfg=True), ImageItem(img(378), "vit", enable_cfg=True),
                TextItem(ids(24), enable_cfg=True), ImageItem(img(512), "vae_noised", loss=True)]

    def und():
        return [ImageItem(img(378), "vit"), TextItem(ids(24)), TextItem(ids(200), loss=True)]

    kinds = {"t2i": t2i, "edit": edit, "und": und}
    return [SamplePlan(kinds[kind](), f"anchor{r}.{i}.{kind}") for r in range(repeats) for i, kind in enumerate(ANCHOR_ORDER)]


def tiny_special(vocab: int) -> SpecialTokens:
    return SpecialTokens(bos=vocab - 4, eos=vocab - 3, vision_start=vocab - 2, vision_end=vocab - 1)


def build_batch(dims: ModelDims, batch: str, seed: int, tiny: bool):
    g = torch.Generator().manual_seed(seed)
    vocab = dims.llm.vocab_size
    plans = anchor_plans(g, vocab, repeats=2 if batch == "32k" else 1)
    special = tiny_special(vocab) if tiny else SPECIAL_7B
    packed = pack(plans, special=special, geometry=PackGeometry.from_dims(dims), generator=g)
    n, _, h, w = packed.padded_images.shape
    d = dims.bagel.vae_downsample
    # Without --vae the frozen VAE is not run (as in perf-anchors.md): N(0,1) latents of the encoder's
    # output shape. The images are returned for --vae, which encodes them in each step.
    latent = torch.randn(n, dims.bagel.latent_channels, h // d, w // d, generator=g)
    images, packed.padded_images = packed.padded_images, None
    return packed, latent, images


def build_ae(a, device: torch.device) -> AutoEncoder:
    """The frozen autoencoder the trainer runs (random weights; conf/model's FLUX shape, or tiny.yaml's)."""
    params = OmegaConf.to_object(tiny_model_config().ae) if a.tiny else ModelConfig().ae
    return AutoEncoder(params).to(device).eval().requires_grad_(False)


def lora_method() -> MethodConfig:
    cfg = OmegaConf.merge(OmegaConf.structured(MethodConfig), OmegaConf.load(REPO / "conf/method/unicot.yaml"))
    return OmegaConf.to_object(cfg)


def build_model(a, dims: ModelDims, env: D.DistEnv):
    """Random weights materialised straight on the device (meta build, no checkpoint)."""
    dtype = torch.bfloat16 if a.params == "bf16" else torch.float32
    bagel = build_bagel(dims, device=env.device, dtype=dtype, seed=0)
    if env.device.type == "cuda":
        bagel.attn_backend = "flex"
    if a.lora:
        from umm.methods.unicot import UniCoTRecipe

        method = lora_method()
        method.lora.r, method.lora.alpha = a.lora, 2 * a.lora
        model = UniCoTRecipe(method).prepare_model(bagel)
    else:
        model = bagel
    model = parallel.prepare(model, env, ac=a.ac, compile=a.compile,
                             param_dtype=torch.bfloat16 if a.params == "fp32" else None,
                             reshard_after_forward=a.reshard, fsdp=a.fsdp or None)
    return model


# ---------------------------------------------------------------------------- timing


def phases_ms(timeline: StepTimeline, clock: str = "gpu") -> dict:
    """A finished step's phases (the caller synchronized first) on ``clock``: the GPU's (on CUDA; the
    host's on the CPU) or the host's (how long the host took to queue each phase)."""
    parts = timeline.last_step()
    return parts.get(clock, parts["host"])


def timed_steps(step, n: int, device: torch.device, finish=None):
    """``n`` steps, each timed by its own timeline, and the wall time over all of them (``finish``, the
    side streams' join, inside it): (each step's phases in ms, each step's result, mean ms per step,
    each step's host phases)."""
    wall, timelines, results = StepTimeline(device), [], []
    wall.begin()
    for _ in range(n):
        timelines.append(StepTimeline(device))
        results.append(step(timelines[-1]))
    if finish is not None:
        finish()
    wall.mark("steps")
    wall.end_step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return ([phases_ms(t) for t in timelines], results, phases_ms(wall)["steps"] / n,
            [phases_ms(t, "host") for t in timelines])


def make_step(model, batch, latent, env, a, vae=None):
    """One training step; ``vae``: (autoencoder, images) encoded in the step as the trainer does (its
    ``latent`` replaces the given one)."""
    method = MethodConfig(name="bench", recipe="sft")
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in trainable]
    # Pure bf16 parameters (--params bf16) have no fp32 weights to keep anywhere else.
    train = TrainConfig(precision="bf16", master_weights=a.master_weights if a.params == "fp32" else "params")
    weights, optimizer = optimizer_for(model, trainable, train, OptimConfig(lr=1e-5), env.device)
    ema = None
    if a.ema in ("gpu", "gpu-side"):
        ema = Ema(weights, 0.9999, optimizer=optimizer, fuse=a.ema == "gpu")
    elif a.ema == "cpu":
        ema = AsyncCpuEma(weights, 0.9999, optimizer)
    autocast = torch.autocast(env.device.type, dtype=torch.bfloat16)

    def step(timeline: StepTimeline):
        timeline.begin()
        with autocast:
            z = latent
            if vae is not None:
                with torch.no_grad():
                    z = vae[0].encode(vae[1], sample=True)
                timeline.mark("vae")
            out = model(batch, z)
        parts = compute_loss(out, method, env, grad_accum=1)
        timeline.mark("forward_loss")
        parts.loss.backward()
        timeline.mark("backward")
        clip_for_step(optimizer, params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        timeline.mark("clip_optimizer")
        if ema is not None:
            ema.update()
        timeline.mark("ema")
        timeline.end_step()
        return parts

    def finish():
        """The side streams' work (EMA) joins the main stream."""
        if ema is not None:
            ema.join()

    step.finish = finish
    step.master_weights = "params" if weights is trainable else "optimizer"
    return step, len(params), sum(p.numel() for p in params), sum(D.local(p).numel() for p in params)


def profiled_step(model_step, device):
    """One more step under the profiler: host ops with their input shapes, and the GPU's kernels."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda, record_shapes=True) as prof:
        model_step(StepTimeline(device))
        model_step.finish()
        if cuda:
            torch.cuda.synchronize()
    return prof


MATMUL_NAMES = ("gemm", "nvjet", "cutlass", "xmma", "gemv", "cublas")


def kernel_kind(name: str) -> str:
    name = name.lower()
    if "nccl" in name:
        return "comm"
    if "flex" in name or "flash" in name or "fmha" in name or "attention" in name or "sdpa" in name:
        return "attention"
    if any(s in name for s in MATMUL_NAMES):
        return "matmul"
    if "adam" in name:
        return "optimizer"
    if "lerp" in name:
        return "ema"
    return "other"


def mlp_matmul_ms(ops, mlp_widths) -> float:
    """Matmul kernel time (ms) of the ops whose inputs have an MLP's inner width.

    ``ops``: (input shapes, [(kernel name, µs), ...]) of each host op that launched kernels; the
    MLPs' projections (and their LoRA adapters) are the only products with those widths.
    """
    widths = set(mlp_widths)

    def has_width(shape) -> bool:  # a tensor's shape; scalars and tensor lists give no match
        return isinstance(shape, (list, tuple)) and any(isinstance(d, int) and d in widths for d in shape)

    return sum(us for shapes, kernels in ops if any(map(has_width, shapes))
               for name, us in kernels if kernel_kind(name) == "matmul") / 1000


def kernel_split(events, mlp_widths, top: int = 30) -> dict:
    """GPU time of the profiled step (``prof.events()``) by kernel kind and the ``top`` costliest
    kernels, in ms.

    ``matmul`` is split into ``mlp`` (the MLPs' projections, by their launching op's input widths)
    and the rest. ``kernels_total`` over the step's wall time shows how busy the GPU was (side
    streams overlap). The GPU-side ranges of annotations (compiled graphs, ``Optimizer.step``) span
    kernels and are not counted.
    """
    kinds = {"attention": 0.0, "matmul": 0.0, "comm": 0.0, "optimizer": 0.0, "ema": 0.0, "other": 0.0}
    by_name: dict = {}
    ops = []
    for ev in events:
        if ev.device_type.name == "CPU":
            if ev.kernels:
                ops.append((ev.input_shapes or [], [(k.name, k.duration) for k in ev.kernels]))
            continue
        if ev.device_type.name != "CUDA" or getattr(ev, "is_user_annotation", False):
            continue
        us = ev.device_time if hasattr(ev, "device_time") else ev.cuda_time
        total, count = by_name.get(ev.name, (0.0, 0))
        by_name[ev.name] = (total + us / 1000, count + 1)
        kinds[kernel_kind(ev.name)] += us / 1000
    split = {k: round(v, 2) for k, v in kinds.items()}
    split["kernels_total"] = round(sum(kinds.values()), 2)
    split["mlp"] = round(mlp_matmul_ms(ops, mlp_widths), 2)  # part of "matmul"
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]
    split["top"] = [[name[:120], round(ms, 3), n] for name, (ms, n) in ranked]
    return split


def progress(env: D.DistEnv, msg: str, t0: float) -> None:
    """Rank 0's progress on stderr (where a slow device run spends its time)."""
    if env.is_main:
        print(f"[bench {time.perf_counter() - t0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def compile_report() -> dict:
    """Where compile time went (dynamo's timed phases: calls and total seconds; the slowest Triton
    kernels to compile) and what it counted (graphs, recompiles, cache hits)."""
    from torch._dynamo.utils import compilation_time_metrics, counters

    return {"phases_s": {k: [len(v), round(sum(v), 2)] for k, v in compilation_time_metrics.items()},
            "slowest_kernels_s": slowest_kernel_compiles(),
            "counters": {k: dict(v) for k, v in counters.items() if v}}


def summarise(times_ms):
    return {"mean": statistics.fmean(times_ms), "min": min(times_ms), "max": max(times_ms),
            "each": [round(t, 2) for t in times_ms]}


def run_bagel(a, env: D.DistEnv) -> dict:
    torch.manual_seed(env.rank)
    dims = bench_dims(a)
    t0 = time.perf_counter()
    model = build_model(a, dims, env)
    if env.device.type == "cuda":
        torch.cuda.empty_cache()  # the unsharded copies freed by FSDP2
    progress(env, f"model built ({dims.llm.num_hidden_layers} LLM / {dims.vit_num_layers} ViT layers)", t0)
    batch, latent, images = build_batch(dims, a.batch, seed=1000 + env.rank, tiny=a.tiny)
    counts = F.token_counts(batch)
    batch, latent = batch.to(env.device), latent.to(env.device)
    vae = (build_ae(a, env.device), images.to(env.device)) if a.vae else None
    step, n_tensors, n_trainable, n_local = make_step(model, batch, latent, env, a, vae)
    build_s = time.perf_counter() - t0
    progress(env, f"batch of {counts.tokens} tokens packed, optimizer and EMA ({a.ema}) ready", t0)
    lora = F.lora_step_flops(F.lora_params(model), counts) if a.lora else 0.0
    flops = F.bagel_step_flops(dims, counts, frozen_base=bool(a.lora), lora_flops=lora)

    losses, warm_s = [], []
    for _ in range(a.warmup):
        t = time.perf_counter()
        parts = step(StepTimeline(env.device))
        if env.device.type == "cuda":
            torch.cuda.synchronize()
        warm_s.append(time.perf_counter() - t)
        if len(warm_s) == 1:
            first_step_s = time.time() - _PROCESS_START
        progress(env, f"warm-up step {len(warm_s)}: {warm_s[-1]:.1f}s", t0)
        losses.append((float(parts.ce) * env.world_size, float(parts.mse) * env.world_size))
    if env.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    # The step time is the device's wall time over all timed steps (side streams joined at the end),
    # so idle gaps between steps and work overlapped on side streams are both counted as they run.
    spans, results, wall_ms, host_spans = timed_steps(step, a.steps, env.device, finish=step.finish)
    progress(env, f"{a.steps} timed steps done", t0)
    losses += [(float(p.ce) * env.world_size, float(p.mse) * env.world_size) for p in results]
    step_ms = [sum(s.values()) for s in spans]
    # Every rank's step takes as long as the slowest rank's: report rank 0's (they are in lockstep).
    mean_s = wall_ms / 1000
    result = {
        "kind": "bagel",
        "tag": a.tag,
        "device": torch.cuda.get_device_name(env.device) if env.device.type == "cuda" else "cpu",
        "gpus": env.world_size,
        "layers": dims.llm.num_hidden_layers,
        "vit_layers": dims.vit_num_layers,
        "params": a.params, "master_weights": step.master_weights,
        "ac": a.ac, "compile": a.compile, "ema": a.ema, "lora": a.lora, "inductor": a.inductor, "vae": a.vae,
        "fsdp": env.distributed or a.fsdp,
        "reshard_after_forward": a.reshard if env.distributed or a.fsdp else None,
        "tokens_per_gpu": counts.tokens,
        "token_counts": counts.__dict__,
        "trainable_params": n_trainable,  # DTensor numel is the global size
        "trainable_params_on_rank0": n_local,  # rank 0's shard under FSDP2
        "trainable_tensors": n_tensors,
        "step_wall_ms": mean_s * 1000,
        "step_ms": summarise(step_ms),  # per step, from its phase events
        "phase_ms": {name: statistics.fmean(s[name] for s in spans) for name in spans[0]},
        # Host time per phase: where it exceeds phase_ms, the GPU waited for the host to queue kernels.
        "host_phase_ms": {name: statistics.fmean(s[name] for s in host_spans) for name in host_spans[0]},
        "tokens_per_s_per_gpu": counts.tokens / mean_s,
        "tflop_per_step_per_gpu": flops["total"] / 1e12,
        "flops_terms_tflop": {k: v / 1e12 for k, v in flops.items()},
        "mfu": F.mfu(flops["total"], mean_s),
        "loss_first_last": [losses[0], losses[-1]],
        "warmup_s": warm_s,
        "build_s": build_s,
        "process_to_first_step_s": first_step_s if a.warmup else None,
        "compile": compile_report(),
    }
    if env.device.type == "cuda":
        result["peak_alloc_gib"] = torch.cuda.max_memory_allocated(env.device) / 2**30
        result["peak_reserved_gib"] = torch.cuda.max_memory_reserved(env.device) / 2**30
    split = a.profile and env.device.type == "cuda"
    if split or a.trace:  # one profiled step feeds both; every rank runs it (FSDP2's collectives)
        prof = None
        try:
            prof = profiled_step(step, env.device)
            if split:
                widths = (dims.llm.intermediate_size, dims.vit.intermediate_size)
                result["kernel_ms"] = kernel_split(prof.events(), widths)
        except Exception as e:  # the timing above stands without the split
            if not split:
                raise
            result["kernel_ms"] = f"profiler failed: {e!r}"
        if prof is not None and a.trace and env.is_main:
            write_trace(prof, a.trace)
    return result


# ---------------------------------------------------------------------------- stock anchor


def run_hf_anchor(a, env: D.DistEnv) -> dict:
    """perf-anchors.md anchor 1: transformers Qwen2ForCausalLM at BAGEL's LLM widths, text only."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    llm = LLMConfig()
    cfg = Qwen2Config(hidden_size=llm.hidden_size, intermediate_size=llm.intermediate_size,
                      num_hidden_layers=a.layers, num_attention_heads=llm.num_attention_heads,
                      num_key_value_heads=llm.num_key_value_heads, vocab_size=llm.vocab_size,
                      tie_word_embeddings=False, use_cache=False, attn_implementation="sdpa")
    with torch.device(env.device):
        model = Qwen2ForCausalLM(cfg)  # transformers' own random init, on the GPU
    if a.hf_anchor == "bf16":
        model.to(torch.bfloat16)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-15, weight_decay=0.0,
                            fused=env.device.type == "cuda")
    ids = torch.randint(0, 150000, (1, a.hf_tokens), device=env.device)
    autocast = torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=a.hf_anchor == "fp32_ac")

    def step(timeline: StepTimeline):
        timeline.begin()
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        timeline.mark("forward_loss")
        loss.backward()
        timeline.mark("backward")
        opt.step()
        opt.zero_grad(set_to_none=True)
        timeline.mark("optimizer")
        timeline.end_step()
        return loss

    for _ in range(a.warmup):
        step(StepTimeline(env.device))
    if env.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    spans, _, wall_ms, _ = timed_steps(step, a.steps, env.device)
    step_ms = [sum(s.values()) for s in spans]
    n_params = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    fl = F.qwen2_anchor_flops(n_params, a.layers, a.hf_tokens, llm.hidden_size)
    mean_s = wall_ms / 1000
    out = {"kind": "hf_qwen2_anchor", "tag": a.tag, "mode": a.hf_anchor, "layers": a.layers,
           "device": torch.cuda.get_device_name(env.device) if env.device.type == "cuda" else "cpu",
           "tokens": a.hf_tokens, "step_wall_ms": mean_s * 1000, "step_ms": summarise(step_ms),
           "tokens_per_s": a.hf_tokens / mean_s,
           "tflop_per_step": fl / 1e12, "mfu": F.mfu(fl, mean_s)}
    if env.device.type == "cuda":
        out["peak_alloc_gib"] = torch.cuda.max_memory_allocated(env.device) / 2**30
    return out


# ---------------------------------------------------------------------------- main


class BenchConfigError(ValueError):
    """A benchmark setting that cannot run here."""


def main(argv=None) -> dict:
    a = parse_args(argv)
    if not a.tiny and not str(a.device).startswith("cuda"):
        raise BenchConfigError(f"--device {a.device}: the real widths (3-15B parameters) need a GPU; "
                               "use --tiny for a CPU run")
    env = D.setup(a.device)
    if a.fsdp and not torch.distributed.is_initialized():
        # One process: a one-rank group for FSDP2 (torchrun with one process does not start one).
        store = torch.distributed.HashStore()
        torch.distributed.init_process_group("nccl" if env.device.type == "cuda" else "gloo",
                                             store=store, rank=0, world_size=1)
    try:
        result = run_hf_anchor(a, env) if a.hf_anchor else run_bagel(a, env)
        if env.is_main:
            line = json.dumps(result)
            print("RESULT " + line, flush=True)
            if a.out:
                with open(a.out, "a") as f:
                    f.write(line + "\n")
            s = result
            print(f"{s.get('tag') or s['kind']}: step {s.get('step_wall_ms', s['step_ms']['mean']):.1f} ms, "
                  f"{s.get('tokens_per_s_per_gpu', s.get('tokens_per_s')):.0f} tok/s/GPU, MFU {100 * s['mfu']:.1f}%, "
                  f"peak {s.get('peak_alloc_gib', float('nan')):.1f} GiB", flush=True)
        return result
    finally:
        D.teardown(env)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
    exit_now(0)  # a finished rank can abort in interpreter teardown (see umm.train.worker.exit_now)
