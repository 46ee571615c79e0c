"""Full state dicts out of a (possibly sharded, possibly LoRA-injected) model, in upstream key names.

peft renames what it wraps (``q_proj.weight`` → ``q_proj.base_layer.weight``; ``get_peft_model``
adds ``base_model.model.``) and adds ``lora_*`` tensors. Checkpoint ``model``/``ema`` files keep
upstream's names for the base weights; LoRA tensors travel separately (training names for resume,
and peft's own adapter format for users).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

import torch


ADAPTER_DIRS = {"raw": "adapter", "ema": "adapter_ema"}


def is_adapter_key(name: str) -> bool:
    return ".lora_" in name


def upstream_key(name: str) -> str:
    return name.replace("base_model.model.", "").replace(".base_layer", "")


def _peft_root(model: torch.nn.Module):
    for prefix, module in model.named_modules():
        if isinstance(getattr(module, "peft_config", None), dict):
            return prefix, module
    return None, None


def write_adapters(model: torch.nn.Module, raw: Dict[str, torch.Tensor], ema: Optional[Dict[str, torch.Tensor]],
                   out: Path) -> None:
    """peft's own format (adapter_model.safetensors + adapter_config.json), raw and EMA weights
    (``ema`` None: the run keeps no EMA, so no ``adapter_ema/``)."""
    from umm.train.checkpoint import write_safetensors

    prefix, root = _peft_root(model)
    if root is None:
        return
    from peft import get_peft_model_state_dict

    strip = len(prefix) + 1 if prefix else 0
    for kind, tensors in (("raw", raw), ("ema", ema)):
        if tensors is None:
            continue
        sub = {k[strip:]: v for k, v in tensors.items() if not prefix or k.startswith(prefix + ".")}
        target = Path(out) / ADAPTER_DIRS[kind]
        target.mkdir(parents=True, exist_ok=True)
        for name, config in root.peft_config.items():
            peft_sd = get_peft_model_state_dict(root, state_dict=sub, adapter_name=name)
            write_safetensors(peft_sd, target / "adapter_model.safetensors")
            config.save_pretrained(str(target))
            break  # one adapter per run
