"""umm reads upstream's dataset files and plans and packs them exactly as upstream's own code did.

The vector set (tests/data/vectors/recipe_plans_a, its README says what produced it; another set of
the same layout via UMM_PLAN_VECTORS) holds rows in upstream's file formats, a tokenizer, and per
sample what upstream's dataset class yielded (plan items, text ids, transformed images, every random
choice it made), plus upstream's packs. For every recipe and dataset group in it, umm's readers read
the same rows, umm's planners (fed upstream's recorded random results through ``ctx.rng``) must
give the same plans, and umm's packer the same packed tensors.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
from functools import lru_cache
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from umm.config.schema import ImageTransformConfig, MethodConfig
from umm.data.budget import plan_num_tokens
from umm.data.datasets import Manifest
from umm.data.packing import NO_DROPOUT, PackGeometry, SpecialTokens, pack
from umm.data.plan import ImageItem, TextItem
from umm.data.transforms import ImageTransform
from umm.methods import get_recipe
from umm.model.tokenizer import load_tokenizer

VECTORS = Path(__file__).parent / "vectors" / "recipe_plans_a"

# Upstream's recipe (the vector set's name for it) -> umm's recipe.
RECIPES = {"sft_t2i": "sft", "sft_edit": "sft", "sft_vlm": "sft", "reca": "reca", "irg": "irg", "unicot": "unicot"}
# Upstream's dataset class -> the umm dataset kind that reads its rows.
KINDS = {
    "data.t2i_dataset.T2IIterableDataset": "t2i",
    "data.t2i_dataset.ReconstructionDataset": "images",
    "data.interleave_datasets.edit_dataset.UnifiedEditIterableDataset": "edit",
    "data.vlm_dataset.SftJSONLIterableDataset": "vlm",
    "data.interleave_datasets.multi_think_interleave_t2i_dataset.MultiThinkInterleaveT2IDataset": "interleaved",
    "data.interleave_datasets.mdp_dataset.UnifiedEditIterableDataset_MDPT2I": "mdp_t2i",
    "data.interleave_datasets.mdp_dataset.UnifiedEditIterableDataset_MDPedit": "mdp_edit",
    "data.interleave_datasets.mdp_dataset.UnifiedEditIterableDataset_MDPGeo": "mdp_geo",
}
UPSTREAM_MAX_PIXELS = 14 * 14 * 9 * 1024  # ImageTransform's default when a config gives none
ITEM_TYPE = {"vit": "vit_image", "vae_clean": "vae_image", "vae_noised": "vae_image"}


def vectors_dir() -> Path:
    d = Path(os.environ.get("UMM_PLAN_VECTORS", VECTORS))
    if not (d / "plans.json").is_file():
        pytest.fail(f"recipe plan vectors not found at {d} (UMM_PLAN_VECTORS or {VECTORS})")
    return d


@lru_cache(maxsize=None)
def _set(d: Path):
    return json.loads((d / "plans.json").read_text()), load_tokenizer(d)


def _cases():
    plans, _ = _set(vectors_dir())
    return [(r, g) for r, rv in sorted(plans["recipes"].items()) for g in sorted(rv["groups"])]


def _pack_cases():
    plans, _ = _set(vectors_dir())
    return [(r, p) for r, rv in sorted(plans["recipes"].items()) for p in sorted(rv["packs"])]


class RecordedRandom:
    """Stands in for ``ctx.rng``: gives upstream's recorded results in order, checking that each call
    is the same kind of draw over the same choices. It has only the draws upstream made, so any
    other draw fails."""

    def __init__(self, calls, where: str):
        self.calls, self.where, self.used = list(calls), where, 0

    def _next(self, fn: str):
        assert self.used < len(self.calls), f"{self.where}: umm drew {fn}() beyond upstream's {len(self.calls)} draws"
        call = self.calls[self.used]
        self.used += 1
        assert call["fn"] == fn, f"{self.where}: draw {self.used} is {fn}() in umm, {call['fn']}() upstream"
        return call

    def random(self) -> float:
        return self._next("random")["result"]

    def choice(self, seq):
        call = self._next("choice")
        if "seq" in call:
            assert isinstance(seq, range) and f"range({seq.start},{seq.stop})" == call["seq"], (self.where, seq, call)
        else:
            assert len(seq) == call["seq_len"], (self.where, len(seq), call)
        return seq[call["index"]]

    def done(self) -> None:
        assert self.used == len(self.calls), f"{self.where}: umm made {self.used} of upstream's {len(self.calls)} draws"


def _transform(args) -> ImageTransformConfig:
    return ImageTransformConfig(stride=args["image_stride"], min_size=args["min_image_size"],
                                max_size=args["max_image_size"], max_pixels=args.get("max_pixels", UPSTREAM_MAX_PIXELS))


def _recipe(d: Path, recipe: str):
    plans, _ = _set(d)
    rv = plans["recipes"][recipe]
    assert recipe in RECIPES, f"vector recipe {recipe!r} has no umm recipe in RECIPES"
    think_drop = [g.get("think_drop") for g in rv["dataset_groups"].values() if "think_drop" in g]
    cfg = MethodConfig(name=RECIPES[recipe], recipe=RECIPES[recipe], think_drop=think_drop[0] if think_drop else 0.0)
    umm_recipe = get_recipe(cfg)
    templates = [c for g in rv["groups"].values() for s in g["samples"] for c in s["random_calls"]
                 if c["module"] == "data.t2i_dataset" and recipe == "reca"]
    if templates:  # recA: upstream's template list is not ours; its drawn entries at their indices
        umm_recipe.templates = [f"template {i}" for i in range(templates[0]["seq_len"])]
        for c in templates:
            umm_recipe.templates[c["index"]] = c["result"]
    return umm_recipe


def _manifest(d: Path, recipe: str, group: str, file: str) -> Manifest:
    plans, _ = _set(d)
    gv = plans["recipes"][recipe]["groups"][group]
    kind = KINDS[gv["dataset_class"]]
    images = Path(file).parent / "images"
    image_dir = str(images) if kind == "vlm" and (d / "data" / images).is_dir() else None
    return Manifest(group, kind, file, root=str(d / "data"), image_dir=image_dir)


def _row_index(manifest: Manifest, d: Path, source_row) -> int:
    path = d / "data" / source_row["file"]
    if "line_index" in source_row:
        want = f"{os.path.realpath(path)}:{source_row['line_index'] + 1}"
    elif "member" in source_row:
        want = f"{os.path.realpath(path)}:{source_row['member']}"
    else:
        meta = pq.read_metadata(path)
        first = sum(meta.row_group(g).num_rows for g in range(source_row["row_group"]))
        want = f"{os.path.realpath(path)}:row{first + source_row['row']}"
    index = {manifest.source(i): i for i in range(len(manifest))}
    assert want in index, f"umm's reader of {path} has no row {want}"
    return index[want]


def _transforms(d: Path, recipe: str, group: str):
    plans, _ = _set(d)
    gv = plans["recipes"][recipe]["groups"][group]
    vae, vit = gv["transform"]["vae"], gv["transform"]["vit"]
    if KINDS[gv["dataset_class"]] == "vlm":  # upstream's VLM loader has one transform: the ViT one
        vae, vit = None, vae
    fallback = {"image_stride": 16, "min_image_size": 512, "max_image_size": 1024}
    return ImageTransform(_transform(vae or fallback)), ImageTransform(_transform(vit or {**fallback, "image_stride": 14}))


def _plan(d: Path, recipe: str, group: str, source_row, calls, where: str):
    _, tokenizer = _set(d)
    manifest = _manifest(d, recipe, group, source_row["file"])
    example = manifest.read(_row_index(manifest, d, source_row))
    umm_recipe = _recipe(d, recipe)
    vae, vit = _transforms(d, recipe, group)
    rng = RecordedRandom(calls, where)
    # Upstream has no resize limit; the vector rows are small pictures scaled up to the minimum sizes.
    ctx = umm_recipe.context(example, rng=rng, tokenizer=tokenizer, vae_transform=vae, vit_transform=vit,
                             max_resize_factor=math.inf)
    plan = umm_recipe.plan(example, ctx)
    rng.done()
    return plan, vae, vit


def _sha(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.to(torch.float32).contiguous().numpy().tobytes()).hexdigest()


@pytest.mark.parametrize("recipe,group", _cases())
def test_plans_equal_upstream(recipe, group):
    d = vectors_dir()
    plans, _ = _set(d)
    samples = plans["recipes"][recipe]["groups"][group]["samples"]
    assert samples, f"{recipe}/{group} has no samples"
    for s in samples:
        where = f"{recipe}/{group} sample {s['index']} ({s['source_row']})"
        plan, vae, vit = _plan(d, recipe, group, s["source_row"], s["random_calls"], where)
        got = [{"type": "text" if isinstance(i, TextItem) else ITEM_TYPE[i.role], "enable_cfg": int(i.enable_cfg),
                "loss": int(i.loss), "special_token_loss": int(i.special_token_loss),
                "special_token_label": i.special_token_label} for i in plan.items]
        assert got == s["sequence_plan"], where
        assert [i.ids for i in plan.items if isinstance(i, TextItem)] == s["text_ids_list"], where
        images = [i.image for i in plan.items if isinstance(i, ImageItem)]
        assert [list(im.shape) for im in images] == [im["shape"] for im in s["images"]], where
        assert [_sha(im) for im in images] == [im["sha256"] for im in s["images"]], where
        assert plan_num_tokens(plan, vae_stride=vae.stride, vit_stride=vit.stride) == s["plan_length_check"], where


def _upstream_row_groups(d: Path, group_cfg, group_dir: Path, seed: int):
    """(file, row group) of each global row-group index, as upstream's set_epoch(seed) orders them."""
    files = sorted(p for p in group_dir.iterdir() if p.suffix == ".parquet")
    used = group_cfg["num_used_data"][0]
    files = (files * (used // len(files) + 1))[:used]
    groups = sorted((str(f), g) for f in files for g in range(pq.read_metadata(f).num_row_groups))
    random.Random(seed).shuffle(groups)
    return groups


def _pack_members(d: Path, recipe: str, name: str):
    """(group, source_row, random calls) of every sample of a pack, in pack order."""
    plans, _ = _set(d)
    rv = plans["recipes"][recipe]
    pv = rv["packs"][name]
    if "samples" in pv:  # one group's samples
        return [(name, s["source_row"], s["random_calls"]) for s in (rv["groups"][name]["samples"][i] for i in pv["samples"])]
    seed = plans["seeds"]["data_seed_set_epoch"]
    out = []
    for entry in pv["tensors"]["batch_data_indexes"]:  # a mixed pack (IRG stages): [global row group, row]
        group = entry["dataset_name"]
        files = {Path(s["source_row"]["file"]).parent for s in rv["groups"][group]["samples"]}
        assert len(files) == 1, f"{recipe}/{group}: samples from several folders"
        folder = files.pop()
        global_rg, row = entry["data_indexes"]
        path, rg = _upstream_row_groups(d, pv["groups_config"][group], d / "data" / folder, seed)[global_rg]
        rel = os.path.relpath(path, d / "data")
        calls = [s["random_calls"] for s in rv["groups"][group]["samples"] if s["source_row"].get("row") == row]
        assert not any(calls[:1]), f"{recipe}/{group}: a mixed pack of samples with random draws is not supported"
        out.append((group, {"file": rel, "row_group": rg, "row": row}, []))
    return out


@pytest.mark.parametrize("recipe,name", _pack_cases())
def test_packs_equal_upstream(recipe, name):
    d = vectors_dir()
    plans, _ = _set(d)
    rv = plans["recipes"][recipe]
    pv = rv["packs"][name]
    expected = pv["tensors"]
    stored = load_file(str(d / "packed.safetensors"))
    members = _pack_members(d, recipe, name)
    sample_plans = [_plan(d, recipe, g, src, calls, f"{recipe}/{name} {src}")[0] for g, src, calls in members]
    noised = [i for p in sample_plans for i in p.items if isinstance(i, ImageItem) and i.role == "vae_noised"]
    assert len(noised) == len(pv["timestep_draws"])
    for item, draw in zip(noised, pv["timestep_draws"]):  # upstream's np.random.randn() per generated image
        item.timestep_logit = draw
    st = rv["special_tokens"]
    special = SpecialTokens(bos=st["bos_token_id"], eos=st["eos_token_id"], vision_start=st["start_of_image"],
                            vision_end=st["end_of_image"])
    geometry = PackGeometry(vit_patch_size=14, vit_max_num_patch_per_side=70, latent_downsample=16,
                            max_latent_size=rv["trainer"]["max_latent_size"])
    for key, value in rv["cond_dropout_set"].items():
        assert value == 0.0, f"{key}: the vectors are recorded without condition dropout"
    batch = pack(sample_plans, special=special, geometry=geometry, cfg_dropout=NO_DROPOUT)

    # Flex packing appends one padding sample (and split) up to max_num_tokens; umm's packer does not pad.
    assert batch.sequence_length == expected["sequence_length"]
    assert batch.sample_lens == expected["sample_lens"][:-1]
    assert batch.split_lens == expected["split_lens"][:-1]
    assert batch.attn_modes == expected["attn_modes"][:-1]
    assert [list(s) for s in batch.vae_latent_shapes] == expected.get("patchified_vae_latent_shapes", [])
    for field in ("padded_images", "packed_vit_tokens"):
        mine = getattr(batch, field)
        if field not in expected:
            assert mine is None or mine.numel() == 0, field
            continue
        assert list(mine.shape) == expected[field]["shape"] and _sha(mine) == expected[field]["sha256"], field
    tensors = ["packed_text_ids", "packed_text_indexes", "packed_position_ids", "packed_vae_token_indexes",
               "packed_latent_position_ids", "packed_vit_token_indexes", "packed_vit_position_ids", "vit_token_seqlens",
               "packed_timesteps", "mse_loss_indexes", "packed_label_ids", "ce_loss_indexes", "ce_loss_weights"]
    for field in tensors:
        mine = getattr(batch, field)
        mine = torch.tensor(mine, dtype=torch.long) if isinstance(mine, list) else mine
        if field not in expected:  # upstream leaves out what the pack has none of
            assert mine.numel() == 0, field
            continue
        theirs = stored[expected[field]["tensor"]]
        assert list(theirs.shape) == expected[field]["shape"], field
        if theirs.numel() == 0:  # stored as float32 by upstream (built from an empty list)
            assert mine.numel() == 0, field
            continue
        assert mine.dtype == theirs.dtype and torch.equal(mine, theirs), field
