"""Merge a checkpoint's LoRA adapter into its base weights and write a complete BAGEL model dir.

    python scripts/merge_lora.py outputs/<run>/checkpoints/0000100 --out merged/ [--ema] [--model-dir DIR]

The base is the checkpoint's ``ema.safetensors``, or ``model.safetensors`` where the run kept no EMA
(with LoRA the base weights never train, so either is the model the run started from); the adapter is ``adapter/`` (raw weights) or, with ``--ema``,
``adapter_ema/``, loaded through peft's own ``PeftModel.from_pretrained`` and folded in with
``merge_and_unload``. The output holds the configs, ``ema.safetensors`` (upstream key names), the
autoencoder and the tokenizer, so it loads wherever a BAGEL model dir loads. Configs, autoencoder
and tokenizer come from ``--model-dir``, else from the run's ``resolved.yaml`` (``model.path``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

import torch


class MergeError(RuntimeError):
    pass


def _model_dir_of(checkpoint: Path) -> Path:
    resolved = checkpoint.parent.parent / "resolved.yaml"
    if not resolved.is_file():
        raise MergeError(f"no --model-dir given and no {resolved} to read model.path from")
    from omegaconf import OmegaConf

    return Path(OmegaConf.load(resolved).model.path)


def merge(checkpoint: Path, out: Path, *, use_ema: bool = False, model_dir: Optional[Path] = None) -> Path:
    from peft import PeftModel
    from safetensors.torch import load_file

    from umm.model.io import check_state_dict, expected_shapes, load_model_dir, save_model_dir
    from umm.train.checkpoint import is_complete

    checkpoint = Path(checkpoint)
    if not is_complete(checkpoint):
        raise MergeError(f"{checkpoint} is not a complete checkpoint (no COMPLETE marker)")
    adapter = checkpoint / ("adapter_ema" if use_ema else "adapter")
    if use_ema and not adapter.exists() and (checkpoint / "adapter").is_dir():
        raise MergeError(f"{checkpoint} has no adapter EMA (its run kept none: train.ema_decay=null); merge without --ema")
    if not (adapter / "adapter_config.json").is_file():
        raise MergeError(f"{checkpoint} has no LoRA adapter ({adapter} missing): was method.lora.enabled on?")
    if not (adapter / "adapter_model.safetensors").is_file():
        # peft would fall back to a pickled adapter_model.bin; adapters are read from safetensors only.
        raise MergeError(f"{adapter} has no adapter_model.safetensors (pickled adapter files are not loaded)")
    model_dir = Path(model_dir) if model_dir else _model_dir_of(checkpoint)

    loaded = load_model_dir(model_dir, device="cpu", dtype=torch.float32)
    base_file = checkpoint / "ema.safetensors"
    if not base_file.is_file():
        base_file = checkpoint / "model.safetensors"
    base = load_file(str(base_file))
    check_state_dict(expected_shapes(loaded.bagel), base, str(base_file))
    loaded.bagel.load_state_dict(base, strict=True)
    merged = PeftModel.from_pretrained(loaded.bagel, str(adapter)).merge_and_unload()
    return save_model_dir(merged, out, ae=loaded.ae, tokenizer_from=model_dir)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="a checkpoint dir: <run>/checkpoints/<step>")
    parser.add_argument("--out", type=Path, required=True, help="model dir to write")
    parser.add_argument("--ema", action="store_true", help="merge the adapter's EMA (adapter_ema/)")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="model dir with the configs, autoencoder and tokenizer (default: the run's model.path)")
    args = parser.parse_args(argv)
    try:
        out = merge(args.checkpoint, args.out, use_ema=args.ema, model_dir=args.model_dir)
    except (MergeError, FileNotFoundError) as e:
        print(f"merge_lora: {e}", file=sys.stderr)
        return 2
    print(f"merged model dir written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
