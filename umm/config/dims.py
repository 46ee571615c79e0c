"""Build dims of the model parts (BAGEL-7B-MoT's by default): the config schema's ``model.llm`` and
``model.vit``. Plain dataclasses in the config layer, so the schema imports nothing above it;
umm/model/config.py extends them with what a model dir's JSON files hold."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class LLMDims:
    """Qwen2 dims (BAGEL-7B-MoT's by default); also the config schema's ``model.llm`` (build dims)."""

    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    vocab_size: int = 152064
    rope_theta: float = 1000000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768


@dataclass
class ViTDims:
    """SigLIP dims (BAGEL-7B-MoT's by default); also the config schema's ``model.vit``."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    # As stated in vit_config.json; the model builds num_hidden_layers + 1 + vit_select_layer.
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    patch_size: int = 14
    image_size: int = 980
