"""Recipe test helpers: plan real synthetic rows and train a tiny Bagel on them for a step."""
from __future__ import annotations

import random

import torch

# The data tests' synthetic set and tokenizer fixtures serve the recipe tests too.
from tests.data.conftest import SMALL, synthetic_root, tokenizer, word_tokenizer  # noqa: F401
from tests.model.builders import random_latent, tiny_dims
from umm.config.schema import ImageTransformConfig, LoraConfig, MethodConfig
from umm.data.datasets import Manifest
from umm.data.packing import NO_DROPOUT, PackGeometry, pack
from umm.data.transforms import ImageTransform
from umm.methods import get_recipe
from umm.model.io import build_bagel

VAE = ImageTransform(ImageTransformConfig(stride=16, min_size=64, max_size=64))
VIT = ImageTransform(ImageTransformConfig(stride=14, min_size=56, max_size=56))


def recipe_for(name, **method):
    if isinstance(method.get("lora"), dict):
        method["lora"] = LoraConfig(**method["lora"])
    return get_recipe(MethodConfig(name=name, recipe=name, **method))


def plan_row(recipe, root, kind, row=0, seed=0, tokenizer=None):
    example = Manifest(kind, kind, f"{kind}.jsonl", root=root).read(row)
    ctx = recipe.context(example, rng=random.Random(seed), tokenizer=tokenizer or word_tokenizer(),
                         vae_transform=VAE, vit_transform=VIT, max_resize_factor=8.0)
    return recipe.plan(example, ctx)


def describe(plan):
    """(kind, loss, cfg) per item: 'text' or the image role."""
    return [(getattr(i, "role", "text"), i.loss, i.enable_cfg) for i in plan.items]


def tiny_bagel(seed=0):
    torch.manual_seed(seed)
    return build_bagel(tiny_dims(), seed=seed)


def train_steps(model, plans, tokenizer, *, steps=2, lr=1e-2, seed=0):
    """AdamW steps on the packed plans (two: llm2vae starts at zero, so one step moves only it)."""
    batch = pack(plans, special=tokenizer.special, geometry=PackGeometry.from_dims(tiny_dims()),
                 generator=torch.Generator().manual_seed(seed), cfg_dropout=NO_DROPOUT)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    latent = random_latent(batch, tiny_dims(), seed) if batch.padded_images is not None else None
    losses = []
    for step in range(steps):
        out = model(batch, latent, generator=torch.Generator().manual_seed(seed + step))
        loss = out.mse_per_token.mean() + (out.ce_per_token.mean() if out.ce_per_token.numel() else 0.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses
