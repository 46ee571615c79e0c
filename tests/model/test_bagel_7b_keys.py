"""A state dict with BAGEL-7B-MoT's keys and shapes (reference/bagel.md §1.3) loads on the meta device."""
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from umm.config.schema import ModelConfig
from umm.model.config import dims_from_build_config
from umm.model.io import CheckpointMismatchError, build_on_meta, materialize_from_state_dict


def bagel_7b_mot_shapes():
    """Written out from the release's key list, independently of our module tree."""
    H, I, V, KV, HD = 3584, 18944, 152064, 512, 128
    s = {
        "language_model.model.embed_tokens.weight": (V, H),
        "language_model.lm_head.weight": (V, H),
        "language_model.model.norm.weight": (H,),
        "language_model.model.norm_moe_gen.weight": (H,),
    }
    for i in range(28):
        p = f"language_model.model.layers.{i}."
        for e in ("", "_moe_gen"):
            s[f"{p}input_layernorm{e}.weight"] = (H,)
            s[f"{p}post_attention_layernorm{e}.weight"] = (H,)
            s[f"{p}self_attn.q_proj{e}.weight"], s[f"{p}self_attn.q_proj{e}.bias"] = (H, H), (H,)
            for kv in ("k", "v"):
                s[f"{p}self_attn.{kv}_proj{e}.weight"], s[f"{p}self_attn.{kv}_proj{e}.bias"] = (KV, H), (KV,)
            s[f"{p}self_attn.o_proj{e}.weight"] = (H, H)
            s[f"{p}self_attn.q_norm{e}.weight"] = s[f"{p}self_attn.k_norm{e}.weight"] = (HD,)
            s[f"{p}mlp{e}.gate_proj.weight"] = s[f"{p}mlp{e}.up_proj.weight"] = (I, H)
            s[f"{p}mlp{e}.down_proj.weight"] = (H, I)
    vH, vI = 1152, 4304
    v = "vit_model.vision_model."
    s[f"{v}embeddings.patch_embedding.weight"], s[f"{v}embeddings.patch_embedding.bias"] = (vH, 588), (vH,)
    s[f"{v}embeddings.position_embedding.weight"] = (4900, vH)
    for j in range(26):
        p = f"{v}encoder.layers.{j}."
        for n in ("layer_norm1", "layer_norm2"):
            s[f"{p}{n}.weight"] = s[f"{p}{n}.bias"] = (vH,)
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            s[f"{p}self_attn.{n}.weight"], s[f"{p}self_attn.{n}.bias"] = (vH, vH), (vH,)
        s[f"{p}mlp.fc1.weight"], s[f"{p}mlp.fc1.bias"] = (vI, vH), (vI,)
        s[f"{p}mlp.fc2.weight"], s[f"{p}mlp.fc2.bias"] = (vH, vI), (vH,)
    s[f"{v}post_layernorm.weight"] = s[f"{v}post_layernorm.bias"] = (vH,)
    s.update({
        "connector.fc1.weight": (H, vH), "connector.fc1.bias": (H,),
        "connector.fc2.weight": (H, H), "connector.fc2.bias": (H,),
        "vit_pos_embed.pos_embed": (4900, H),
        "time_embedder.mlp.0.weight": (H, 256), "time_embedder.mlp.0.bias": (H,),
        "time_embedder.mlp.2.weight": (H, H), "time_embedder.mlp.2.bias": (H,),
        "vae2llm.weight": (H, 64), "vae2llm.bias": (H,),
        "llm2vae.weight": (64, H), "llm2vae.bias": (64,),
        "latent_pos_embed.pos_embed": (4096, H),
    })
    return s


def bagel_7b_mot_dims():
    """Dims of conf/model/bagel_7b_mot.yaml, through the typed schema."""
    yaml = Path(__file__).resolve().parents[2] / "conf" / "model" / "bagel_7b_mot.yaml"
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(yaml)))
    return dims_from_build_config(cfg)


def meta_state(shapes):
    return {k: torch.empty(v, dtype=torch.bfloat16, device="meta") for k, v in shapes.items()}


def test_release_key_list_is_complete():
    shapes = bagel_7b_mot_shapes()
    assert len(shapes) == 1223
    assert sum(torch.Size(v).numel() for v in shapes.values()) == 14_607_260_128


def test_bagel_7b_mot_state_dict_loads_on_meta():
    model = build_on_meta(bagel_7b_mot_dims())
    materialize_from_state_dict(model, meta_state(bagel_7b_mot_shapes()), source="7b", device="meta", dtype=torch.bfloat16)
    params = dict(model.named_parameters())
    assert len(params) == 1223 and all(p.is_meta for p in params.values())
    assert sum(p.numel() for p in params.values()) == 14_607_260_128
    assert not params["vit_pos_embed.pos_embed"].requires_grad
    assert params["language_model.model.layers.27.mlp_moe_gen.down_proj.weight"].requires_grad


def test_missing_unexpected_and_shape_errors_name_the_keys():
    dims = bagel_7b_mot_dims()
    shapes = bagel_7b_mot_shapes()
    bad = meta_state(shapes)
    del bad["llm2vae.bias"]
    bad["language_model.model.layers.28.mlp.up_proj.weight"] = torch.empty(1, device="meta")
    with pytest.raises(CheckpointMismatchError, match=r"1 missing keys \[llm2vae.bias\].*1 unexpected keys"):
        materialize_from_state_dict(build_on_meta(dims), bad, source="7b", device="meta", dtype=None)
    bad = meta_state(shapes)
    bad["latent_pos_embed.pos_embed"] = torch.empty(1024, 3584, device="meta")
    with pytest.raises(CheckpointMismatchError, match=r"latent_pos_embed.pos_embed: checkpoint \(1024, 3584\) vs model \(4096, 3584\)"):
        materialize_from_state_dict(build_on_meta(dims), bad, source="7b", device="meta", dtype=None)
