"""Tiny model dims and packed batches for the model tests (no reference files needed)."""
from __future__ import annotations

import torch

from umm.data.packing import PackGeometry, SpecialTokens, pack
from umm.data.plan import ImageItem, SamplePlan, TextItem
from umm.model.config import BagelConfig, LLMConfig, ModelDims, ViTConfig

SPECIAL = SpecialTokens(bos=951, eos=952, vision_start=959, vision_end=960)


def tiny_dims(layers: int = 2, hidden: int = 64) -> ModelDims:
    return ModelDims(
        llm=LLMConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=1000),
        vit=ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                      patch_size=14, image_size=56),
        bagel=BagelConfig(max_latent_size=8, vit_max_num_patch_per_side=4, latent_channels=4, vae_downsample=8),
    )


def _img(g, h, w):
    return torch.rand(3, h, w, generator=g) * 2 - 1


def _ids(g, n):
    return torch.randint(0, 950, (n,), generator=g).tolist()


def t2i_plan(g) -> SamplePlan:
    return SamplePlan([TextItem(_ids(g, 6), enable_cfg=True), ImageItem(_img(g, 32, 48), "vae_noised", loss=True)], "t2i")


def und_plan(g) -> SamplePlan:
    return SamplePlan([ImageItem(_img(g, 28, 42), "vit"), TextItem(_ids(g, 5)), TextItem(_ids(g, 9), loss=True)], "und")


def edit_plan(g) -> SamplePlan:
    return SamplePlan(
        [ImageItem(_img(g, 32, 32), "vae_clean", enable_cfg=True), ImageItem(_img(g, 28, 28), "vit", enable_cfg=True),
         TextItem(_ids(g, 5), enable_cfg=True), ImageItem(_img(g, 32, 32), "vae_noised", loss=True)], "edit")


def text_plan(g, n: int = 12) -> SamplePlan:
    return SamplePlan([TextItem(_ids(g, 4)), TextItem(_ids(g, n), loss=True)], "text")


def pack_plans(plans, dims: ModelDims, seed: int = 0):
    return pack(plans, special=SPECIAL, geometry=PackGeometry.from_dims(dims), generator=torch.Generator().manual_seed(seed))


def mixed_batch(dims: ModelDims, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return pack_plans([t2i_plan(g), und_plan(g), edit_plan(g)], dims, seed)


def random_latent(batch, dims: ModelDims, seed: int = 0) -> torch.Tensor:
    """Stand-in for autoencoder.encode(batch.padded_images): right shape, random values."""
    n, _, H, W = batch.padded_images.shape
    d = dims.bagel.vae_downsample
    return torch.randn(n, dims.bagel.latent_channels, H // d, W // d, generator=torch.Generator().manual_seed(seed))
