"""recA and UniCoT through the real training loop on a tiny model: what moves and what does not."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.train.conftest import build_model_dir, run_config
from umm.config.schema import DatasetConfig
from umm.data.synthetic import generate
from umm.model.parts import part_of
from umm.train.loop import train

from .conftest import SMALL

CONF = Path(__file__).resolve().parents[2] / "conf"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_model_dir(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("data") / "synthetic")
    generate(root, SMALL)
    return root


pytestmark = pytest.mark.usefixtures("one_thread")


def _run(tmp_path, model_dir, data_root, method, datasets, steps, **overrides):
    cfg = run_config(tmp_path, model_dir, data_root, **{"train.max_steps": steps, "train.save_every": steps,
                                                         **overrides})
    cfg.method = method
    cfg.data.datasets = {name: DatasetConfig(**spec) for name, spec in datasets.items()}
    result = train(cfg)
    assert result["status"] == "completed"
    return tmp_path / "checkpoints" / f"{steps:07d}"


def _method(name, **fields):
    from omegaconf import OmegaConf

    from umm.config.schema import MethodConfig

    base = OmegaConf.load(CONF / "method" / f"{name}.yaml")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(MethodConfig), base, fields))


def test_reca_moves_every_generation_weight_and_nothing_else(tmp_path, model_dir, data_root):
    ckpt = _run(tmp_path, model_dir, data_root, _method("reca"), {"images": {"kind": "t2i", "path": "t2i.jsonl"}}, 4)
    before = load_file(str(model_dir / "ema.safetensors"))
    after = load_file(str(ckpt / "model.safetensors"))
    for key, value in before.items():
        trainable = part_of(key) in ("llm_gen", "gen_heads") and not key.endswith("pos_embed.pos_embed")
        assert torch.equal(value, after[key]) != trainable, key
    ce = [json.loads(line)["ce"] for line in open(tmp_path / "metrics.jsonl")]
    assert all(c == 0 for c in ce)  # recA trains on flow matching alone


def test_unicot_lora_moves_only_adapters(tmp_path, model_dir, data_root):
    # CE on the chain texts: the tiny base passes image loss no gradient into the adapters.
    lora = {"lora": {"r": 4, "alpha": 8}, "chain_text_loss": True}
    datasets = {"unicot": {"kind": "unicot", "path": "unicot.jsonl", "is_mandatory": True},
                "t2i": {"kind": "t2i", "path": "t2i.jsonl"}}
    ckpt = _run(tmp_path, model_dir, data_root, _method("unicot", **lora), datasets, 3,
                **{"data.max_num_tokens_per_sample": 320})
    assert not (ckpt / "model.safetensors").exists()  # the frozen base is the model dir's
    adapter = load_file(str(ckpt / "adapter" / "adapter_model.safetensors"))
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: it moved
    assert any("mlp_moe_gen" in k for k in adapter) and any(".mlp." in k for k in adapter)
