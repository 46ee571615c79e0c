"""``umm export <run dir | checkpoint | model dir> <out dir> [--weights ema|raw|both] [--lora merge|adapter]``

Writes a BAGEL model dir, the layout of BAGEL-7B-MoT (reference/bagel.md §1.1): the model dir's
configs, tokenizer files and ``ae.safetensors`` copied as they are (the autoencoder never trains),
and the checkpoint's weights in bf16 under upstream's key names: ``ema.safetensors`` (the EMA, the
file BAGEL's own code loads) and/or ``model.safetensors`` (the raw trained weights). A LoRA run's
adapter is folded into the base weights, or with ``--lora adapter`` copied beside them in peft's
format (``adapter/`` raw, ``adapter_ema/`` EMA). Tensors stream one at a time, so host memory holds
about one tensor, not the model. The dir is written under a temporary name and renamed when whole.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch

from umm.errors import UmmError, one_line
from umm.export.source import WEIGHTS, Source, resolve
from umm.model.io import WEIGHT_FILES
from umm.train.stream_safetensors import write_streamed

# Model-dir files that are not copied: its weights (replaced), the shard index of a sharded
# release (it would point at files the export does not write), our build marker.
SKIP = {*WEIGHT_FILES.values(), "model.safetensors.index.json", "COMPLETE"}


class ExportError(UmmError, ValueError):
    pass


def _copy_model_files(src: Source, out: Path) -> None:
    for f in sorted(src.model_dir.iterdir()):
        if f.is_file() and f.name not in SKIP and not f.name.startswith("."):
            shutil.copyfile(f, out / f.name)
    if src.num_layers is not None:  # the run trained a cut LLM: say so in its config
        path = out / "llm_config.json"
        cfg = json.loads(path.read_text())
        cfg["num_hidden_layers"] = src.num_layers
        path.write_text(json.dumps(cfg, indent=2))


def _bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16) if t.is_floating_point() else t


def export(source: Source, out: Path, *, weights: str = "ema", lora: str = "merge") -> Path:
    from umm.train.state_dict import ADAPTER_DIRS

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} exists and is not empty; choose a new out dir (nothing was written)")
    kinds = ["ema", "raw"] if weights == "both" else [weights]
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _copy_model_files(source, tmp)
        adapters = {kind: source.adapter(kind) for kind in kinds}
        for kind in kinds:
            layout = {k: (torch.bfloat16 if dt.is_floating_point else dt, shape)
                      for k, (dt, shape) in source.shapes(kind).items()}
            tensors = ((k, _bf16(t)) for k, t in source.tensors(kind, merge_lora=lora == "merge"))
            write_streamed(tmp / WEIGHT_FILES[WEIGHTS[kind]], layout, tensors)
            if lora == "adapter" and adapters[kind] is not None:
                shutil.copytree(adapters[kind].path, tmp / ADAPTER_DIRS[kind])
        (tmp / "umm_export.json").write_text(json.dumps({
            "source": str(source.checkpoint or source.model_dir), "model_dir": str(source.model_dir),
            "weights": kinds, "lora": lora if adapters[kinds[0]] is not None else None, "dtype": "bfloat16",
        }, indent=2))
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="umm export", description="Write a run's weights as a BAGEL model dir "
                                     "(bf16, upstream key names; see umm/export/cli.py).")
    parser.add_argument("source", help="a run dir (its newest complete checkpoint), a checkpoint dir, or a model dir")
    parser.add_argument("out", help="the BAGEL model dir to write (must not exist, or be empty)")
    parser.add_argument("--weights", choices=("ema", "raw", "both"), default="ema",
                        help="ema -> ema.safetensors, raw -> model.safetensors, both (default: ema)")
    parser.add_argument("--lora", choices=("merge", "adapter"), default="merge",
                        help="a LoRA run: fold the adapter into the weights, or keep it as a peft adapter dir")
    parser.add_argument("--model-dir", default=None,
                        help="configs, autoencoder and tokenizer (default: the run's model.path)")
    args = parser.parse_args(argv)
    try:
        source = resolve(args.source, args.model_dir)
        out = export(source, Path(args.out), weights=args.weights, lora=args.lora)
    except (UmmError, OSError) as e:
        print(f"umm export: error: {one_line(e)}", file=sys.stderr)
        return 2
    print(f"umm export: wrote {out.absolute()} from {source.checkpoint or source.model_dir}")
    if args.weights == "raw":
        print("umm export: note: BAGEL's own inference code loads ema.safetensors; rename model.safetensors "
              "to ema.safetensors to use the raw weights there")
    return 0
