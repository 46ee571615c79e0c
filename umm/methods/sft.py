"""SFT: everything but the autoencoder trains on t2i, edit, interleaved and VLM rows; CE + MSE.

Sequence plans follow upstream's datasets (reference/bagel.md §6.4):
- t2i: caption (cfg-droppable) -> noised target image.
- edit: source as clean VAE + ViT (cfg-droppable) -> instruction (cfg-droppable) -> noised target.
- interleaved: the row's parts in order with their own loss/cfg flags.
- vlm: human turns (no loss) with ViT images at their ``<image>`` marks -> gpt turns (CE); nothing is
  cfg-droppable.
"""
from __future__ import annotations

from typing import Dict, List

from umm.data.datasets import Example
from umm.data.plan import ImageItem, PlanItem
from umm.methods.base import (ALL_PARTS, PlanContext, Planner, Recipe, condition_image, interleaved_items,
                              target_image, text)


class SFTRecipe(Recipe):
    name = "sft"
    default_trainable = frozenset(ALL_PARTS)

    def planners(self) -> Dict[str, Planner]:
        return {"t2i": self.plan_t2i, "edit": self.plan_edit, "interleaved": self.plan_interleaved,
                "vlm": self.plan_vlm}

    def plan_t2i(self, example: Example, ctx: PlanContext) -> List[PlanItem]:
        caption = ctx.rng.choice(example.fields["caption"])
        return [text(ctx, caption, cfg=True), *target_image(ctx, example.fields["image"])]

    def plan_edit(self, example: Example, ctx: PlanContext) -> List[PlanItem]:
        f = example.fields
        return [*condition_image(ctx, f["source"], cfg=True), text(ctx, f["instruction"], cfg=True),
                *target_image(ctx, f["target"])]

    def plan_interleaved(self, example: Example, ctx: PlanContext) -> List[PlanItem]:
        return interleaved_items(ctx, example.fields["parts"])

    def plan_vlm(self, example: Example, ctx: PlanContext) -> List[PlanItem]:
        images = list(example.fields["images"])
        turns = example.fields["conversations"]
        placed = any("<image>" in t["value"] for t in turns if t["from"] == "human")
        items: List[PlanItem] = []
        if not placed:  # no marks: images go first, as LLaVA data without <image> expects
            items += [ImageItem(image=ctx.vit(img), role="vit") for img in images]
            images = []
        for turn in turns:
            if turn["from"] == "gpt":
                items.append(text(ctx, turn["value"].strip(), loss=True))
                continue
            pieces = turn["value"].split("<image>")
            for i, piece in enumerate(pieces):
                if i > 0:
                    items.append(ImageItem(image=ctx.vit(images.pop(0)), role="vit"))
                if piece.strip():
                    items.append(text(ctx, piece.strip()))
        return items


def build(cfg) -> SFTRecipe:
    return SFTRecipe(cfg)
