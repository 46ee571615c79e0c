"""UniCoT's LoRA path through the trainer: only adapters move, peft-format adapters, resume (merge: tests/export).

The runs keep no EMA, as upstream's LoRA trainer (train/pretrain_unified_navit_lora.py: "we don't
support using lora with ema") and umm's unicot pipeline: checkpoints hold no ema files. Nor do they
hold model.safetensors: it would repeat the frozen base; the adapters and the shards are the run."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from umm.config.schema import DatasetConfig
from umm.train.loop import train

from .conftest import run_config

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "q_proj_moe_gen", "k_proj_moe_gen", "v_proj_moe_gen",
           "o_proj_moe_gen", "gate_proj", "up_proj", "down_proj"]


def unicot_config(run_dir, model_dir, data_root, **overrides):
    return run_config(run_dir, model_dir, data_root, **{
        "method.name": "unicot", "method.recipe": "unicot", "method.lora.enabled": True,
        "method.lora.r": 8, "method.lora.alpha": 16, "method.lora.target_modules": TARGETS,
        "train.ema_decay": None,
        # Text CE: the tiny model's llm2vae starts at zero and stays frozen, so MSE alone gives no adapter a gradient.
        "method.chain_text_loss": True,
        "data.datasets": {"unicot": DatasetConfig(kind="unicot", path="unicot.jsonl", weight=2.0, is_mandatory=True),
                          "t2i": DatasetConfig(kind="t2i", path="t2i.jsonl")},
        **overrides})


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, model_dir, data_root):
    torch.set_num_threads(1)
    run_dir = tmp_path_factory.mktemp("lora")
    train(unicot_config(run_dir, model_dir, data_root, **{"train.max_steps": 4}))
    return run_dir


def test_only_adapters_train_and_save_in_peft_format(lora_run, model_dir):
    ckpt = lora_run / "checkpoints" / "0000004"  # the run's last: full files for any other method
    assert not any(p.exists() for p in (ckpt / "model.safetensors", ckpt / "ema.safetensors", ckpt / "adapter_ema"))
    shards = load_file(str(ckpt / "state" / "shards.rank00000.safetensors"))
    trained = [k for k in shards if k.startswith("model/")]
    assert trained and all(".lora_A." in k or ".lora_B." in k for k in trained)  # only the adapters
    assert not any(k.startswith("ema/") for k in shards)
    meta = json.loads((ckpt / "state" / "meta.json").read_text())
    assert meta["ema"] is False and meta["consolidated"] is False
    adapter = load_file(str(ckpt / "adapter" / "adapter_model.safetensors"))
    config = json.loads((ckpt / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["lora_alpha"] == 16
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(".default." not in k for k in adapter)
    assert any(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: it moved


def test_lora_run_resumes_exactly(lora_run, model_dir, data_root, tmp_path):
    train(unicot_config(tmp_path, model_dir, data_root, **{"train.max_steps": 2}))
    # Step 3's checkpoint is written in the background (train.async_save), its adapter files too.
    train(unicot_config(tmp_path, model_dir, data_root, **{"train.max_steps": 4, "train.save_every": 3,
                                                           "train.async_save": True}))
    rows = lambda d: [(r["step"], r["loss"]) for r in map(json.loads, open(d / "metrics.jsonl"))]  # noqa: E731
    assert rows(tmp_path) == rows(lora_run)
    three, four = (load_file(str(tmp_path / "checkpoints" / s / "adapter" / "adapter_model.safetensors"))
                   for s in ("0000003", "0000004"))
    assert three.keys() == four.keys() and not all(torch.equal(v, four[k]) for k, v in three.items())


def test_init_from_a_lora_checkpoint_says_how_to_merge_it(lora_run, model_dir, data_root, tmp_path):
    from umm.train.checkpoint import CheckpointError

    ckpt = lora_run / "checkpoints" / "0000004"
    with pytest.raises(CheckpointError, match=r"holds its adapters, not full weights; merge them with `umm export "):
        train(unicot_config(tmp_path, model_dir, data_root, **{"method.init_from": str(ckpt)}))
    assert not (tmp_path / "checkpoints").exists()


def test_export_of_a_run_without_ema_asks_for_the_raw_weights(lora_run, model_dir, tmp_path, capsys):
    # `--weights ema` is the default, and UniCoT keeps no EMA: the error says what to pass.
    from umm.export.cli import main as export_main

    args = [str(lora_run / "checkpoints" / "0000004"), str(tmp_path / "out"), "--model-dir", str(model_dir)]
    assert export_main(args) == 2
    err = capsys.readouterr().err
    assert "has no adapter_ema/" in err and "pass --weights raw" in err and "pickled" not in err, err
    assert not (tmp_path / "out").exists()
    assert export_main(args + ["--weights", "raw"]) == 0
