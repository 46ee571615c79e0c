"""Fold a checkpoint's LoRA adapter (peft's format) into its base weights, one tensor at a time.

peft's ``merge_and_unload`` needs the whole model in memory; here each base weight ``W`` of a
targeted Linear becomes ``W + scaling * B @ A`` as it streams past (fp32), with peft's scaling
``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA). Adapter options that change that formula (DoRA,
fan_in_fan_out, per-module ranks, trained biases or extra modules) are refused, not guessed.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Mapping, Tuple

import torch
from safetensors.torch import load_file

from umm.errors import UmmError

PREFIX = "base_model.model."


class AdapterError(UmmError, ValueError):
    """A LoRA adapter that cannot be merged (missing files, options this merge does not implement)."""


@dataclass
class Adapter:
    path: Path
    scaling: float
    pairs: Dict[str, Tuple[torch.Tensor, torch.Tensor]]  # base weight key -> (A [r, in], B [out, r])

    def check_targets(self, layout: Mapping[str, Tuple[torch.dtype, Tuple[int, ...]]], source: str) -> None:
        for key, (a, b) in self.pairs.items():
            if key not in layout or tuple(layout[key][1]) != (b.shape[0], a.shape[1]):
                raise AdapterError(f"{self.path} adapts {key} {(b.shape[0], a.shape[1])}, which {source} does not "
                                   f"hold with that shape; the adapter belongs to another model")

    def merged(self, key: str, weight: torch.Tensor) -> torch.Tensor:
        pair = self.pairs.get(key)
        if pair is None:
            return weight
        a, b = pair
        return weight.float() + (b.float() @ a.float()) * self.scaling


def _refuse(path: Path, cfg: dict) -> None:
    bad = []
    if cfg.get("peft_type") != "LORA":
        bad.append(f"peft_type={cfg.get('peft_type')!r}")
    for key in ("use_dora", "fan_in_fan_out"):
        if cfg.get(key):
            bad.append(f"{key}=true")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            bad.append(f"{key} set")
    if cfg.get("bias", "none") != "none":
        bad.append(f"bias={cfg['bias']!r}")
    if cfg.get("modules_to_save"):
        bad.append("modules_to_save set")
    if bad:
        raise AdapterError(f"{path}: cannot merge an adapter with {', '.join(bad)}; export it with --lora adapter")


def read_adapter(path: Path) -> Adapter:
    path = Path(path)
    config, weights = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not config.is_file() or not weights.is_file():
        # peft would fall back to a pickled adapter_model.bin; adapters are read from safetensors only.
        raise AdapterError(f"{path} needs adapter_config.json and adapter_model.safetensors "
                           f"(pickled adapter files are not loaded)")
    cfg = json.loads(config.read_text())
    _refuse(path, cfg)
    r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    halves: Dict[str, Dict[str, torch.Tensor]] = {}
    for name, tensor in load_file(str(weights)).items():
        module, sep, part = name.removeprefix(PREFIX).rpartition(".lora_")
        if not sep or part not in ("A.weight", "B.weight"):
            raise AdapterError(f"{weights}: unexpected tensor {name} (only lora_A / lora_B weights merge)")
        halves.setdefault(module + ".weight", {})[part[0]] = tensor
    pairs = {}
    for key, half in halves.items():
        if set(half) != {"A", "B"}:
            raise AdapterError(f"{weights}: {key} has lora_{''.join(half)} without its other half")
        pairs[key] = (half["A"], half["B"])
    return Adapter(path, scaling, pairs)
