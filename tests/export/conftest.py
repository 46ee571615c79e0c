"""Two tiny runs for export and sampling: SFT (EMA differs from the raw weights) and UniCoT's LoRA."""
from __future__ import annotations

import pytest
import torch

from umm.config.schema import DatasetConfig
from umm.train.loop import train

from tests.train.conftest import data_root, model_dir, run_config, save_run_config  # noqa: F401  (fixtures)


def _trained(run_dir, cfg):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(cfg)
    finally:
        torch.set_num_threads(threads)
    save_run_config(cfg, run_dir / "resolved.yaml")  # what the app writes before a run
    return run_dir


@pytest.fixture(scope="session")
def sft_run(tmp_path_factory, model_dir, data_root):  # noqa: F811
    run_dir = tmp_path_factory.mktemp("sft_run")
    return _trained(run_dir, run_config(run_dir, model_dir, data_root, **{"train.max_steps": 2, "train.save_every": 2}))


@pytest.fixture(scope="session")
def lora_run(tmp_path_factory, model_dir, data_root):  # noqa: F811
    run_dir = tmp_path_factory.mktemp("lora_run")
    cfg = run_config(run_dir, model_dir, data_root, **{
        "method.name": "unicot", "method.recipe": "unicot", "method.lora.enabled": True, "method.lora.r": 4,
        "method.lora.alpha": 8, "method.lora.target_modules": ["q_proj", "v_proj_moe_gen", "up_proj", "down_proj"],
        # The tiny base passes image loss no gradient into the adapters: CE on the chain texts does.
        "method.chain_text_loss": True,
        "data.datasets": {"unicot": DatasetConfig(kind="unicot", path="unicot.jsonl", weight=1.0),
                          "t2i": DatasetConfig(kind="t2i", path="t2i.jsonl")},
        "optim.lr": 1e-2, "train.max_steps": 2, "train.save_every": 2})
    return _trained(run_dir, cfg)
