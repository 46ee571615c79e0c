"""Time forward+backward of the Bagel on one packed batch of mixed samples (t2i, understanding, text).

Random weights, random latents (the autoencoder is not timed). Dims come from a model YAML
(``--model-yaml conf/model/tiny.yaml``) or from the flags (defaults: BAGEL-7B-MoT's widths), e.g.
the CPU figure of issue 3:

    python scripts/bench_model.py --device cpu --dtype fp32 --threads 1 --model-yaml conf/model/tiny.yaml \
        --image 64 --tokens 2048
"""
from __future__ import annotations

import argparse
import time

import torch

from umm.config.schema import ModelConfig
from umm.data.packing import PackGeometry, SpecialTokens, pack
from umm.data.plan import ImageItem, SamplePlan, TextItem
from umm.model.config import dims_from_build_config
from umm.model.io import build_bagel


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="bf16 = fp32 weights + bf16 autocast")
    p.add_argument("--backend", choices=["auto", "sdpa", "flex"], default="auto")
    p.add_argument("--tokens", type=int, default=8192, help="approximate packed length")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing per decoder layer")
    p.add_argument("--compile", action="store_true", help="torch.compile each decoder layer")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--model-yaml", help="a conf/model/*.yaml; its dims replace the dim flags")
    for name, default in [("hidden", 3584), ("inter", 18944), ("layers", 28), ("heads", 28), ("kv-heads", 4),
                          ("vocab", 152064), ("vit-hidden", 1152), ("vit-inter", 4304), ("vit-layers", 27),
                          ("vit-heads", 16), ("image", 224)]:
        p.add_argument(f"--{name}", type=int, default=default)
    return p.parse_args(argv)


def build_dims(a):
    if a.model_yaml:
        from omegaconf import OmegaConf

        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(a.model_yaml)))
        return dims_from_build_config(cfg)
    cfg = ModelConfig()
    cfg.llm.hidden_size, cfg.llm.intermediate_size, cfg.llm.num_hidden_layers = a.hidden, a.inter, a.layers
    cfg.llm.num_attention_heads, cfg.llm.num_key_value_heads, cfg.llm.vocab_size = a.heads, a.kv_heads, a.vocab
    cfg.vit.hidden_size, cfg.vit.intermediate_size = a.vit_hidden, a.vit_inter
    cfg.vit.num_hidden_layers, cfg.vit.num_attention_heads = a.vit_layers, a.vit_heads
    return dims_from_build_config(cfg)


def make_batch(dims, tokens: int, image: int, vocab: int):
    g = torch.Generator().manual_seed(0)
    geo = PackGeometry.from_dims(dims)
    vit_side = image // geo.vit_patch_size * geo.vit_patch_size
    vae_side = image // geo.latent_downsample * geo.latent_downsample
    ids = lambda n: torch.randint(0, vocab - 4, (n,), generator=g).tolist()  # noqa: E731
    img = lambda s: torch.rand(3, s, s, generator=g) * 2 - 1  # noqa: E731
    kinds = [
        lambda: [TextItem(ids(24), enable_cfg=True), ImageItem(img(vae_side), "vae_noised", loss=True)],
        lambda: [ImageItem(img(vit_side), "vit"), TextItem(ids(16)), TextItem(ids(64), loss=True)],
        lambda: [ImageItem(img(vae_side), "vae_clean"), ImageItem(img(vit_side), "vit"), TextItem(ids(16)),
                 ImageItem(img(vae_side), "vae_noised", loss=True)],
        lambda: [TextItem(ids(32)), TextItem(ids(128), loss=True)],
    ]
    special = SpecialTokens(bos=vocab - 4, eos=vocab - 3, vision_start=vocab - 2, vision_end=vocab - 1)
    plans, total, i = [], 0, 0
    while total < tokens:
        plan = SamplePlan(kinds[i % len(kinds)](), f"bench{i}")
        total += pack([plan], special=special, geometry=geo, generator=g).num_tokens
        plans.append(plan)
        i += 1
    return pack(plans, special=special, geometry=geo, generator=g)


def main(argv=None):
    a = parse_args(argv)
    device = torch.device(a.device)
    if a.threads:
        torch.set_num_threads(a.threads)
    dims = build_dims(a)
    model = build_bagel(dims, device=device, seed=0)
    model.attn_backend = a.backend
    if a.checkpointing:
        from torch.utils.checkpoint import checkpoint

        model.language_model.model.layer_wrapper = lambda layer, *args: checkpoint(layer, *args, use_reentrant=False)
    if a.compile:
        for layer in model.layers:
            layer.compile()
    batch = make_batch(dims, a.tokens, a.image, dims.llm.vocab_size).to(device)
    d = dims.bagel.vae_downsample
    n, _, H, W = batch.padded_images.shape
    latent = torch.randn(n, dims.bagel.latent_channels, H // d, W // d, device=device)
    params = sum(p.numel() for p in model.parameters())
    print(f"params {params / 1e6:.1f}M, tokens {batch.num_tokens} (und {batch.num_und}, gen {batch.num_gen}), "
          f"samples {len(batch.sample_lens)}, device {device}, dtype {a.dtype}, backend {a.backend}")
    times, cpu_times = [], []
    for step in range(a.warmup + a.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=a.dtype == "bf16"):
            out = model(batch, latent)
            loss = out.ce_per_token.mean() + out.mse_per_token.mean()
        loss.backward()
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= a.warmup:
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
    mean = sum(times) / len(times)
    print(f"fwd+bwd: mean {mean * 1000:.1f} ms, min {min(times) * 1000:.1f} ms over {len(times)} steps; "
          f"{batch.num_tokens / mean:.0f} tokens/s; process CPU time {min(cpu_times) * 1000:.1f} ms (min)")
    if device.type == "cuda":
        print(f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
