"""Read and write BAGEL model dirs (upstream layout, reference/bagel.md §1.1).

A model dir holds llm_config.json, vit_config.json, bagel_config.json (optional; BAGEL-7B-MoT's
values otherwise), ae.safetensors (+ ae_config.json, else FLUX's params), ema.safetensors (or
model.safetensors) and tokenizer files. The Bagel is built on the meta device and each parameter
is materialised straight from the checkpoint tensor (``assign=True``), so a 14.6B model never needs
a second host copy. Keys are matched strictly.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from umm.config.schema import AEBuildConfig
from umm.errors import MissingFileError, UmmError
from umm.model.autoencoder import AutoEncoder, ae_params_from_dict, ae_params_to_dict, downsample_of
from umm.model.bagel import Bagel
from umm.model.config import ModelDims, read_dims, write_dims

PathLike = Union[str, Path]
WEIGHT_FILES = {"ema": "ema.safetensors", "model": "model.safetensors"}
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens.json")


class CheckpointMismatchError(UmmError, KeyError):
    """A state dict does not fit the model: lists missing/unexpected keys or a shape mismatch."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


@dataclass
class LoadedModel:
    bagel: Bagel
    ae: Optional[AutoEncoder]
    tokenizer: Any
    config: ModelDims


def _short(keys, limit: int = 20) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def check_state_dict(expected: Mapping[str, Sequence[int]], found: Mapping[str, Any], source: str) -> None:
    """Raise one error naming every missing / unexpected key, or the shape mismatches.

    ``found`` maps keys to tensors or to shapes (a safetensors header).
    """
    found = {k: (v.shape if isinstance(v, torch.Tensor) else v) for k, v in found.items()}
    missing = set(expected) - set(found)
    unexpected = set(found) - set(expected)
    if missing or unexpected:
        raise CheckpointMismatchError(
            f"{source} does not match the model: {len(missing)} missing keys [{_short(missing)}], "
            f"{len(unexpected)} unexpected keys [{_short(unexpected)}]; check the model dir's configs"
        )
    bad = [
        f"{k}: checkpoint {tuple(found[k])} vs model {tuple(expected[k])}"
        for k in sorted(expected)
        if tuple(found[k]) != tuple(expected[k])
    ]
    if bad:
        raise CheckpointMismatchError(f"{source}: shape mismatch for {len(bad)} keys: " + "; ".join(bad[:20])
                                      + "; the weights were made for other dims than the model dir's configs")


def expected_shapes(module: nn.Module) -> Dict[str, torch.Size]:
    return {k: v.shape for k, v in module.state_dict().items()}


def build_on_meta(dims: ModelDims) -> Bagel:
    with torch.device("meta"):
        return Bagel(dims)


def load_dtype(key: str, dtype: Optional[torch.dtype], current: torch.dtype) -> torch.dtype:
    """The dtype weight ``key`` loads in: ``dtype`` (its own ``current`` when None), fp32 for position tables."""
    # Fixed position tables stay fp32 (upstream regenerates them in fp32 for training).
    if key.endswith("pos_embed.pos_embed"):
        return torch.float32
    return current if dtype is None else dtype


def _assign(model: nn.Module, state: Dict[str, torch.Tensor]) -> None:
    model.load_state_dict(state, strict=True, assign=True)
    # assign=True keeps each module parameter's requires_grad; make sure fixed tables stay frozen.
    for name, p in model.named_parameters():
        if name.endswith("pos_embed.pos_embed"):
            p.requires_grad_(False)


def materialize_from_state_dict(
    model: nn.Module, state: Mapping[str, torch.Tensor], *, source: str, device, dtype: Optional[torch.dtype]
) -> None:
    """Assign in-memory checkpoint tensors as the model's parameters (strict keys and shapes)."""
    check_state_dict(expected_shapes(model), {k: v.shape for k, v in state.items()}, source)
    _assign(model, {k: v.to(device=device, dtype=load_dtype(k, dtype, v.dtype)) for k, v in state.items()})


def materialize_from_file(
    model: nn.Module, path: Path, *, device, dtype: Optional[torch.dtype], keep: Optional[Callable[[str], bool]] = None
) -> None:
    """Like :func:`materialize_from_state_dict`, reading a safetensors file tensor by tensor.

    Keys and shapes are checked from the header before any data is read; each tensor is read
    straight onto ``device`` and cast before the next one, so host memory never holds two copies.
    """
    read_device = "cpu" if torch.device(device).type == "meta" else str(device)
    with safe_open(str(path), framework="pt", device=read_device) as f:
        keys = [k for k in f.keys() if keep is None or keep(k)]
        check_state_dict(expected_shapes(model), {k: f.get_slice(k).get_shape() for k in keys}, str(path))
        state = {}
        for k in keys:
            t = f.get_tensor(k)
            state[k] = t.to(device=device, dtype=load_dtype(k, dtype, t.dtype))
            del t
    _assign(model, state)


def read_ae_params(model_dir: PathLike) -> AEBuildConfig:
    path = Path(model_dir) / "ae_config.json"
    if path.is_file():
        return ae_params_from_dict(json.loads(path.read_text()), source=str(path))
    return AEBuildConfig()  # FLUX.1 "ae" (BAGEL-7B-MoT ships no ae_config.json)


def load_ae(model_dir: PathLike, *, device="cpu", dtype=torch.float32) -> AutoEncoder:
    path = Path(model_dir) / "ae.safetensors"
    if not path.is_file():
        raise MissingFileError(f"autoencoder weights missing: {path}")
    with torch.device("meta"):
        ae = AutoEncoder(read_ae_params(model_dir))
    materialize_from_file(ae, path, device=device, dtype=dtype)
    return ae.eval().requires_grad_(False)


def weights_path(model_dir: PathLike, weights: str = "ema") -> Path:
    if weights not in WEIGHT_FILES:
        raise ValueError(f"model.weights must be one of {sorted(WEIGHT_FILES)}, got {weights!r}")
    d = Path(model_dir)
    preferred = d / WEIGHT_FILES[weights]
    if preferred.is_file():
        return preferred
    others = [d / f for f in WEIGHT_FILES.values() if (d / f).is_file()]
    if others:
        return others[0]
    raise MissingFileError(f"no weights in model dir {d}: expected {' or '.join(WEIGHT_FILES.values())}")


def require_model_dir(path: PathLike) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise MissingFileError(f"model dir {path} does not exist (set model.path, or build it with scripts/make_tiny_model.py)")
    return path


def read_model_dims(model_dir: PathLike, num_layers: Optional[int] = None) -> ModelDims:
    ae = read_ae_params(require_model_dir(model_dir))
    dims = read_dims(model_dir, ae_latent_channels=ae.z_channels, ae_downsample=downsample_of(ae))
    if num_layers is not None:
        if not 1 <= num_layers <= dims.llm.num_hidden_layers:
            raise ValueError(f"num_layers={num_layers} must be in [1, {dims.llm.num_hidden_layers}]")
        dims.llm.num_hidden_layers = num_layers
    return dims


def layer_index(key: str) -> Optional[int]:
    """The LLM layer weight ``key`` belongs to (None outside the layers)."""
    prefix = "language_model.model.layers."
    if key.startswith(prefix):
        return int(key[len(prefix) :].split(".", 1)[0])
    return None


def load_bagel(
    model_dir: PathLike,
    *,
    device="cpu",
    dtype: Optional[torch.dtype] = torch.float32,
    num_layers: Optional[int] = None,
    weights: str = "ema",
) -> Bagel:
    dims = read_model_dims(model_dir, num_layers)
    path = weights_path(model_dir, weights)
    n = dims.llm.num_hidden_layers
    # A cut LLM (benchmarks) skips the layers it does not build.
    keep = None if num_layers is None else (lambda k: (layer_index(k) is None) or layer_index(k) < n)
    model = build_on_meta(dims)
    materialize_from_file(model, path, device=device, dtype=dtype, keep=keep)
    model.language_model.model.rotary_emb.reset_parameters(torch.device(device))
    return model


def build_bagel(dims: ModelDims, *, device="cpu", dtype: torch.dtype = torch.float32, seed: int = 0) -> Bagel:
    """A randomly initialised Bagel (tiny model dirs, benchmarks), materialised once on ``device``."""
    model = build_on_meta(dims).to_empty(device=device)
    model.init_weights(generator=torch.Generator(device=device).manual_seed(seed))
    if dtype != torch.float32:
        for name, p in model.named_parameters():
            if not name.endswith("pos_embed.pos_embed"):
                p.data = p.data.to(dtype)
    return model


def load_tokenizer(model_dir: PathLike):
    """H2b's tokenizer wrapper (a special-ids-only object for dirs without tokenizer files)."""
    from umm.model import tokenizer as tok

    return tok.load_tokenizer(model_dir)


def load_model_dir(
    path: PathLike,
    *,
    device="cpu",
    dtype: Optional[torch.dtype] = torch.float32,
    num_layers: Optional[int] = None,
    weights: str = "ema",
    with_ae: bool = True,
) -> LoadedModel:
    """Bagel (strict) + autoencoder + tokenizer from a BAGEL model dir."""
    path = require_model_dir(path)
    bagel = load_bagel(path, device=device, dtype=dtype, num_layers=num_layers, weights=weights)
    ae = load_ae(path, device=device, dtype=dtype if dtype is not None else torch.float32) if with_ae else None
    return LoadedModel(bagel=bagel, ae=ae, tokenizer=load_tokenizer(path), config=bagel.dims)


def save_bagel_weights(
    state_dict: Mapping[str, torch.Tensor], path: PathLike, dtype: Optional[torch.dtype] = None
) -> None:
    """One safetensors file with upstream key names (``dtype``: e.g. torch.bfloat16 like the release)."""
    tensors = {
        k: (v.detach().to(dtype) if dtype is not None and v.is_floating_point() else v.detach()).contiguous().cpu()
        for k, v in state_dict.items()
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": "pt"})


def save_model_dir(
    bagel: Bagel,
    out_dir: PathLike,
    *,
    ae: Optional[AutoEncoder] = None,
    dtype: Optional[torch.dtype] = None,
    weights: str = "ema",
    tokenizer_from: Optional[PathLike] = None,
) -> Path:
    """Write configs + weights in the upstream layout; tokenizer files are copied from ``tokenizer_from``."""
    out = Path(out_dir)
    if tokenizer_from is not None:
        out.mkdir(parents=True, exist_ok=True)
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_from) / name).is_file():
                shutil.copyfile(Path(tokenizer_from) / name, out / name)
    write_dims(bagel.dims, out)
    save_bagel_weights(bagel.state_dict(), out / WEIGHT_FILES[weights], dtype)
    if ae is not None:
        (out / "ae_config.json").write_text(json.dumps(ae_params_to_dict(ae.params), indent=2))
        save_bagel_weights(ae.state_dict(), out / "ae.safetensors", dtype)
    return out
