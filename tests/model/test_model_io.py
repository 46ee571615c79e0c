"""Model-dir I/O: save -> load round trip, strict keys, dtype choice, LLM cut, parts."""
import json

import pytest
import torch
from safetensors import safe_open

from umm.config.schema import AEBuildConfig
from umm.model.autoencoder import AutoEncoder
from umm.model.config import ModelConfigError
from umm.model.io import CheckpointMismatchError, build_bagel, load_bagel, load_model_dir, save_bagel_weights, save_model_dir
from umm.model.parts import PARTS, UnknownPartError, part_of, set_trainable
from tests.model.builders import mixed_batch, random_latent, tiny_dims
from tests.model.reference import require_reference

TINY_AE = AEBuildConfig(ch=32, ch_mult=[1, 1, 1, 1], num_res_blocks=1, z_channels=4)


def outputs(model, batch, latent):
    noise = torch.randn(batch.num_gen, model.dims.bagel.latent_token_dim, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = model(batch, latent, noise, return_intermediates=True)
    return out.intermediates["last_hidden_state"], out.ce_per_token, out.mse_per_token


def tiny_dir(tmp_path, dtype=None):
    dims = tiny_dims()
    model = build_bagel(dims, seed=1)
    ae = AutoEncoder(TINY_AE)
    (tmp_path / "special_tokens.json").write_text(json.dumps(
        {"<|im_start|>": 951, "<|im_end|>": 952, "<|vision_start|>": 959, "<|vision_end|>": 960}))
    save_model_dir(model, tmp_path / "m", ae=ae, dtype=dtype, tokenizer_from=tmp_path)
    return model, ae, tmp_path / "m"


def test_round_trip_gives_identical_outputs(tmp_path):
    model, ae, path = tiny_dir(tmp_path)
    loaded = load_model_dir(path)
    assert loaded.config == model.dims
    assert loaded.tokenizer.special.bos == 951
    for k, v in ae.state_dict().items():
        assert torch.equal(loaded.ae.state_dict()[k], v), k
    batch = mixed_batch(model.dims)
    latent = random_latent(batch, model.dims)
    for a, b in zip(outputs(model, batch, latent), outputs(loaded.bagel, batch, latent)):
        assert torch.equal(a, b)
    assert not loaded.bagel.latent_pos_embed.pos_embed.requires_grad


def test_bf16_save_and_load(tmp_path):
    model, _, path = tiny_dir(tmp_path, dtype=torch.bfloat16)
    with safe_open(str(path / "ema.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    bf = load_bagel(path, dtype=torch.bfloat16)
    assert bf.vae2llm.weight.dtype == torch.bfloat16
    assert bf.vit_pos_embed.pos_embed.dtype == torch.float32  # fixed tables stay fp32
    torch.testing.assert_close(bf.vae2llm.weight.float(), model.vae2llm.weight, rtol=1e-2, atol=1e-2)


def test_strict_keys_and_layer_cut(tmp_path):
    model, _, path = tiny_dir(tmp_path)
    cut = load_bagel(path, num_layers=1)
    assert len(cut.layers) == 1
    assert torch.equal(cut.layers[0].mlp_moe_gen.up_proj.weight, model.layers[0].mlp_moe_gen.up_proj.weight)
    state = model.state_dict()
    state.pop("connector.fc2.bias")
    state["extra.weight"] = torch.zeros(1)
    save_bagel_weights(state, path / "ema.safetensors")
    with pytest.raises(CheckpointMismatchError, match=r"missing keys \[connector.fc2.bias\].*unexpected keys \[extra.weight\]"):
        load_bagel(path)
    state = model.state_dict()
    state["vae2llm.weight"] = torch.zeros(64, 8)
    save_bagel_weights(state, path / "ema.safetensors")
    with pytest.raises(CheckpointMismatchError, match=r"vae2llm.weight: checkpoint \(64, 8\) vs model \(64, 16\)"):
        load_bagel(path)


def test_reference_dir_loads_with_its_tokenizer_ids():
    d = require_reference()
    loaded = load_model_dir(d / "model")
    assert loaded.tokenizer.special.vision_start == 959
    assert loaded.ae.z_channels == 4 and loaded.bagel.dims.bagel.latent_token_dim == 16
    assert len(loaded.bagel.vit_model.vision_model.encoder.layers) == 2


def test_every_parameter_has_one_part():
    model = build_bagel(tiny_dims())
    seen = {part_of(n) for n, _ in model.named_parameters()}
    assert seen == set(PARTS)
    assert part_of("_orig_mod.language_model.model.layers.0.self_attn.q_proj_moe_gen.lora_A.default.weight") == "llm_gen"
    assert part_of("module.language_model.model.norm.weight") == "llm_und"
    with pytest.raises(UnknownPartError):
        part_of("decoder.conv_in.weight")
    counts = set_trainable(model, ["llm_gen", "gen_heads"])
    assert counts["llm_und"] == 0 and counts["llm_gen"] > 0
    assert not model.latent_pos_embed.pos_embed.requires_grad
    assert model.llm2vae.weight.requires_grad and not model.language_model.lm_head.weight.requires_grad


def test_bad_config_names_the_file(tmp_path):
    _, _, path = tiny_dir(tmp_path)
    cfg = json.loads((path / "llm_config.json").read_text())
    (path / "llm_config.json").write_text(json.dumps(dict(cfg, num_attention_heads=5)))
    with pytest.raises(ModelConfigError, match="llm_config.json: llm hidden_size 64 is not divisible"):
        load_bagel(path)
    (path / "llm_config.json").write_text(json.dumps(cfg))
    (path / "vit_config.json").unlink()
    with pytest.raises(ModelConfigError, match="vit_config.json is missing"):
        load_bagel(path)
