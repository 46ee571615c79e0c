"""Write a model dir with BAGEL-7B-MoT's files, key set and shapes, random weights, and a byte-level
tokenizer whose special tokens sit at Qwen2.5's ids: a stand-in for the release on machines
without it (real-size smoke runs and benchmarks through ``python -m umm``).

    python scripts/make_shaped_model_dir.py --out /data/bagel_shaped              # 7B, on a GPU: ~1 min
    python scripts/make_shaped_model_dir.py --out /tmp/shaped --model tiny --device cpu

Weights are bf16 like ``ema.safetensors`` of the release (the ViT's position embedding too), built
on ``--device`` and written one tensor at a time; ``ae.safetensors`` is a random FLUX-shaped
autoencoder. Does nothing when the dir is already complete.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from umm.config.schema import ModelConfig  # noqa: E402
from umm.model.autoencoder import AutoEncoder, ae_params_to_dict  # noqa: E402
from umm.model.config import dims_from_build_config, write_dims  # noqa: E402
from umm.model.io import build_bagel, build_on_meta  # noqa: E402
from umm.model.tokenizer import build_byte_level  # noqa: E402

MARKER = "COMPLETE"


def model_config(name: str) -> ModelConfig:
    schema = OmegaConf.structured(ModelConfig)
    return OmegaConf.to_object(OmegaConf.merge(schema, OmegaConf.load(REPO / "conf" / "model" / f"{name}.yaml")))


def write_weights(model: torch.nn.Module, path: Path) -> int:
    """bf16 safetensors of ``model``'s state dict (the host holds one bf16 copy: 29 GB for the 7B
    model). Returns the tensor count."""
    host = {k: v.detach().to(torch.bfloat16).contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(host, str(path), metadata={"format": "pt"})
    return len(host)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="model dir to write")
    p.add_argument("--model", default="bagel_7b_mot", help="conf/model/<name>.yaml giving the dims")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    out = Path(a.out)
    if (out / MARKER).is_file():
        print(f"{out} is complete; nothing to do")
        return
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} exists, is not empty and has no {MARKER} marker: give another --out")
    cfg = model_config(a.model)
    dims = dims_from_build_config(cfg)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    tmp.mkdir(parents=True)
    bagel = build_bagel(dims, device=a.device, dtype=torch.bfloat16, seed=a.seed)
    n = write_weights(bagel, tmp / "ema.safetensors")
    expected = len(build_on_meta(dims).state_dict())
    if n != expected:
        raise SystemExit(f"wrote {n} tensors, the model has {expected}")
    del bagel
    torch.manual_seed(a.seed)
    ae = AutoEncoder(cfg.ae).to(a.device)
    write_weights(ae, tmp / "ae.safetensors")
    (tmp / "ae_config.json").write_text(json.dumps(ae_params_to_dict(ae.params), indent=2))
    write_dims(dims, tmp)
    build_byte_level().save(str(tmp / "tokenizer.json"))
    (tmp / "build_info.json").write_text(json.dumps({"random_weights": True, "model": a.model, "seed": a.seed}))
    (tmp / MARKER).write_text("")
    if out.exists():
        out.rmdir()  # empty (checked above)
    tmp.rename(out)
    size = sum(f.stat().st_size for f in out.iterdir()) / 2**30
    print(f"wrote {out}: {n} tensors, {size:.1f} GiB")


if __name__ == "__main__":
    main()
