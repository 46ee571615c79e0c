"""Shared fixtures for the data and method tests: the synthetic set, a word tokenizer, a data config."""
from __future__ import annotations


import pytest

from umm.config.schema import DataConfig, DatasetConfig, ImageTransformConfig, MethodConfig, RootConfig
from umm.data.packing import PackGeometry
from umm.data.synthetic import SyntheticSettings, generate

SMALL = SyntheticSettings(num_t2i=48, num_edit=24, num_interleaved=12, num_vlm=24, num_unicot=12)
GEOMETRY = PackGeometry(vit_patch_size=14, vit_max_num_patch_per_side=8, latent_downsample=16, max_latent_size=8)


def word_tokenizer():
    """The tiny model's kind of tokenizer: word level over the synthetic vocabulary."""
    from umm.data.synthetic import words
    from umm.methods.reca import template_words
    from umm.model.tokenizer import build_word_level, from_backend

    return from_backend(build_word_level(sorted(set(words()) | set(template_words()))))


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("data") / "synthetic")
    generate(root, SMALL)
    return root


@pytest.fixture(scope="session")
def tokenizer():
    return word_tokenizer()


def data_config(root, datasets, **overrides) -> DataConfig:
    cfg = DataConfig(
        name="test", root=root,
        datasets={name: DatasetConfig(**spec) for name, spec in datasets.items()},
        expected_num_tokens=256, max_num_tokens=288, max_num_tokens_per_sample=256, prefer_buffer_before=128,
        max_buffer_size=8, vae_transform=ImageTransformConfig(stride=16, min_size=64, max_size=64),
        vit_transform=ImageTransformConfig(stride=14, min_size=56, max_size=56),
    )
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


SFT_MIX = {
    "t2i": {"kind": "t2i", "path": "t2i.jsonl", "weight": 2.0},
    "edit": {"kind": "edit", "path": "edit.jsonl", "weight": 1.0},
    "interleaved": {"kind": "interleaved", "path": "interleaved.jsonl", "weight": 0.5},
    "vlm": {"kind": "vlm", "path": "vlm.jsonl", "weight": 1.0, "is_mandatory": True},
}


def root_config(data: DataConfig, recipe: str = "sft", **method) -> RootConfig:
    cfg = RootConfig()
    cfg.data = data
    cfg.method = MethodConfig(name=recipe, recipe=recipe, **method)
    cfg.model.vit.patch_size = 14
    cfg.model.vit_max_num_patch_per_side = 8
    cfg.model.max_latent_size = 8
    return cfg
