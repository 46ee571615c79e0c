"""Fixtures for the trainer tests: a tiny model dir, a small synthetic set, and run configs."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from umm.config.schema import AEBuildConfig, DatasetConfig, ImageTransformConfig, RootConfig
from umm.data.synthetic import SyntheticSettings, generate, words

REPO = Path(__file__).resolve().parents[2]


def worker_env() -> dict:
    """The environment of torchrun's workers: one intra-op thread each, and this checkout importable
    ahead of whatever PYTHONPATH held (umm need not be installed)."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}


SMALL = SyntheticSettings(num_t2i=48, num_edit=12, num_interleaved=6, num_vlm=24, num_unicot=6)


def build_model_dir(out: Path, seed: int = 0, **llm) -> Path:
    """A tiny BAGEL model dir (random weights, untrained AE) in the upstream layout; ``llm``: other
    LLM widths (e.g. a model big enough to measure memory)."""
    from umm.model.autoencoder import AutoEncoder
    from umm.model.bagel import Bagel
    from umm.model.config import BagelConfig, LLMConfig, ModelDims, ViTConfig
    from umm.model.io import save_model_dir
    from umm.model.tokenizer import build_word_level

    tok = build_word_level(words())
    dims = ModelDims(
        llm=LLMConfig(**{"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                         "num_key_value_heads": 2, "vocab_size": tok.get_vocab_size(), **llm}),
        vit=ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                      patch_size=14, image_size=56),
        bagel=BagelConfig(max_latent_size=8, vit_max_num_patch_per_side=4, latent_channels=4, vae_downsample=8),
    )
    torch.manual_seed(seed)
    bagel = Bagel(dims)
    bagel.init_weights(torch.Generator().manual_seed(seed))
    ae = AutoEncoder(AEBuildConfig(resolution=64, ch=32, ch_mult=[1, 1, 1, 1], num_res_blocks=1, z_channels=4))
    save_model_dir(bagel, out, ae=ae)
    tok.save(str(Path(out) / "tokenizer.json"))
    return Path(out)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    return build_model_dir(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("data") / "synthetic")
    generate(root, SMALL)
    return root


def run_config(run_dir, model_dir, data_root, **overrides) -> RootConfig:
    """A small SFT run on CPU; ``overrides`` are dotted keys (``{"train.max_steps": 4}``)."""
    cfg = OmegaConf.structured(RootConfig)
    cfg.pipeline.name = "bagel"
    cfg.method.name, cfg.method.recipe = "sft", "sft"
    cfg.model.name, cfg.model.path = "tiny-test", str(model_dir)
    cfg.model.max_latent_size, cfg.model.vit_max_num_patch_per_side = 8, 4
    cfg.data.name, cfg.data.root = "synthetic-small", str(data_root)
    cfg.data.datasets = {"t2i": DatasetConfig(kind="t2i", path="t2i.jsonl", weight=1.0),
                         "vlm": DatasetConfig(kind="vlm", path="vlm.jsonl", weight=0.5)}
    cfg.data.expected_num_tokens, cfg.data.max_num_tokens = 256, 320
    cfg.data.max_num_tokens_per_sample, cfg.data.prefer_buffer_before = 256, 128
    cfg.data.vae_transform = ImageTransformConfig(stride=16, min_size=64, max_size=64)
    cfg.data.vit_transform = ImageTransformConfig(stride=14, min_size=56, max_size=56)
    cfg.optim.lr = 1e-3
    cfg.train.device, cfg.train.precision, cfg.train.activation_checkpointing = "cpu", "fp32", False
    cfg.train.log_every, cfg.train.save_every, cfg.train.ema_decay = 1, 4, 0.9
    cfg.train.num_sample_prompts = 0
    cfg.logger.progress_bar, cfg.logger.tensorboard = False, False
    cfg.run_dir = str(run_dir)
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, merge=False)
    return OmegaConf.to_object(cfg)


def save_run_config(cfg: RootConfig, path: Path) -> Path:
    OmegaConf.save(OmegaConf.structured(cfg), path)
    return path
