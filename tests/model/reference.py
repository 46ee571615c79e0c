"""Helpers to read the upstream reference vectors (bagel_tiny_ref) for the model tests."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from umm.data.packing import PackGeometry, SpecialTokens, pack
from umm.data.plan import ImageItem, SamplePlan, TextItem

# A copy of shared/vectors/bagel_tiny_ref (made with upstream BAGEL's own code), kept in the repo so
# every CI run checks the model against it; UMM_REFERENCE_VECTORS points elsewhere.
VECTORS = Path(__file__).resolve().parent / "vectors" / "bagel_tiny_ref"


def reference_dir() -> Path:
    return Path(os.environ.get("UMM_REFERENCE_VECTORS", VECTORS))


def require_reference() -> Path:
    d = reference_dir()
    if not (d / "model" / "ema.safetensors").is_file():
        pytest.fail(f"reference vectors not found at {d} (UMM_REFERENCE_VECTORS or {VECTORS})")
    return d


def reference_plans(d: Path):
    raw = json.loads((d / "batch" / "sequence_plan.json").read_text())
    images = load_file(str(d / "batch" / "images.safetensors"))
    plans = []
    for s in raw["samples"]:
        items = []
        for it in s["items"]:
            flags = dict(
                loss=bool(it["loss"]),
                enable_cfg=bool(it["enable_cfg"]),
                special_token_loss=bool(it["special_token_loss"]),
                special_token_label=it["special_token_label"],
            )
            if it["type"] == "text":
                items.append(TextItem(ids=list(it["ids"]), **flags))
            else:
                items.append(
                    ImageItem(image=images[it["image"]], role=it["role"], timestep_logit=it.get("timestep_logit"), **flags)
                )
        plans.append(SamplePlan(items=items, source=s["name"]))
    st = raw["special_tokens"]
    special = SpecialTokens(bos=st["bos"], eos=st["eos"], vision_start=st["vision_start"], vision_end=st["vision_end"])
    return plans, special


def reference_batch(d: Path, dims):
    plans, special = reference_plans(d)
    return pack(plans, special=special, geometry=PackGeometry.from_dims(dims))
