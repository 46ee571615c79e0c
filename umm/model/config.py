"""Typed configs of the BAGEL model parts, read from (and written back to) a BAGEL model dir.

``llm_config.json`` / ``vit_config.json`` keep upstream's conventions: the ViT config states one
layer more than the model builds (depth = num_hidden_layers + 1 + vit_select_layer), and BAGEL's
post-load overrides (qk_norm, untied lm_head, MoT layers) are implied, not stored.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict

from umm.config.dims import LLMDims, ViTDims
from umm.errors import UmmError


class ModelConfigError(UmmError, ValueError):
    """A model dir config file is missing a field or has an unusable value."""


@dataclass
class LLMConfig(LLMDims):
    """llm_config.json: the dims, checked, plus every other key."""

    # Every other key of llm_config.json, written back unchanged on save.
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ModelConfigError(
                f"llm hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelConfigError(
                f"llm num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )


@dataclass
class ViTConfig(ViTDims):
    """vit_config.json: the dims plus every other key."""

    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    extra: Dict[str, Any] = field(default_factory=dict)


@dataclass
class BagelConfig:
    """Bagel-level settings (bagel_config.json if present, else BAGEL-7B-MoT's inference values)."""

    latent_patch_size: int = 2
    max_latent_size: int = 64
    vit_max_num_patch_per_side: int = 70
    connector_act: str = "gelu_pytorch_tanh"
    timestep_shift: float = 1.0
    vit_select_layer: int = -2
    # FLUX AE: 16 latent channels, 8x downsample.
    latent_channels: int = 16
    vae_downsample: int = 8
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def latent_token_dim(self) -> int:
        return self.latent_patch_size**2 * self.latent_channels

    @property
    def latent_downsample(self) -> int:
        """Pixels per latent token side (vae downsample x latent patch)."""
        return self.vae_downsample * self.latent_patch_size


@dataclass
class ModelDims:
    """Everything needed to build a ``Bagel`` module."""

    llm: LLMConfig = field(default_factory=LLMConfig)
    vit: ViTConfig = field(default_factory=ViTConfig)
    bagel: BagelConfig = field(default_factory=BagelConfig)

    @property
    def vit_num_layers(self) -> int:
        n = self.vit.num_hidden_layers + 1 + self.bagel.vit_select_layer
        if n < 1:
            raise ModelConfigError(
                f"ViT depth num_hidden_layers + 1 + vit_select_layer = {n} < 1; "
                f"check vit_config.json num_hidden_layers and vit_select_layer"
            )
        return n


def _split_known(cls, raw: Dict[str, Any], source: str):
    known = {f.name for f in fields(cls) if f.name != "extra"}
    kwargs = {k: v for k, v in raw.items() if k in known}
    extra = {k: v for k, v in raw.items() if k not in known}
    try:
        return cls(**kwargs, extra=extra)
    except ModelConfigError as e:
        raise ModelConfigError(f"{source}: {e}") from None


def _read_json(path: Path) -> Dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelConfigError(f"model dir file {path} is missing") from None
    except json.JSONDecodeError as e:
        raise ModelConfigError(f"{path} is not valid JSON: {e}") from None


def read_dims(model_dir: str | Path, ae_latent_channels: int | None = None, ae_downsample: int | None = None) -> ModelDims:
    """Read llm_config.json, vit_config.json and (optional) bagel_config.json."""
    d = Path(model_dir)
    llm = _split_known(LLMConfig, _read_json(d / "llm_config.json"), "llm_config.json")
    vit = _split_known(ViTConfig, _read_json(d / "vit_config.json"), "vit_config.json")
    bagel_path = d / "bagel_config.json"
    raw = _read_json(bagel_path) if bagel_path.exists() else {}
    bagel = _split_known(BagelConfig, raw, "bagel_config.json")
    if ae_latent_channels is not None:
        bagel.latent_channels = ae_latent_channels
    if ae_downsample is not None:
        bagel.vae_downsample = ae_downsample
    return ModelDims(llm=llm, vit=vit, bagel=bagel)


def _to_json(cfg) -> Dict[str, Any]:
    out = {k: v for k, v in asdict(cfg).items() if k != "extra"}
    out.update(cfg.extra)
    return out


def write_dims(dims: ModelDims, model_dir: str | Path) -> None:
    d = Path(model_dir)
    d.mkdir(parents=True, exist_ok=True)
    (d / "llm_config.json").write_text(json.dumps(_to_json(dims.llm), indent=2))
    (d / "vit_config.json").write_text(json.dumps(_to_json(dims.vit), indent=2))
    (d / "bagel_config.json").write_text(json.dumps(_to_json(dims.bagel), indent=2))


def dims_from_build_config(model_cfg) -> ModelDims:
    """ModelDims from the schema's ``ModelConfig`` (``llm`` / ``vit`` / ``ae`` build dims)."""
    llm = LLMConfig(
        **{f.name: getattr(model_cfg.llm, f.name) for f in fields(LLMConfig) if hasattr(model_cfg.llm, f.name)}
    )
    vit = ViTConfig(
        **{f.name: getattr(model_cfg.vit, f.name) for f in fields(ViTConfig) if hasattr(model_cfg.vit, f.name)}
    )
    ae = model_cfg.ae
    bagel = BagelConfig(
        latent_patch_size=model_cfg.latent_patch_size,
        max_latent_size=model_cfg.max_latent_size,
        vit_max_num_patch_per_side=model_cfg.vit_max_num_patch_per_side,
        connector_act=model_cfg.connector_act,
        timestep_shift=model_cfg.timestep_shift,
        vit_select_layer=model_cfg.vit_select_layer,
        latent_channels=ae.z_channels,
        vae_downsample=2 ** (len(ae.ch_mult) - 1),
    )
    return ModelDims(llm=llm, vit=vit, bagel=bagel)
