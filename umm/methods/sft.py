"""SFT: everything but the autoencoder trains on t2i, edit, interleaved and VLM rows; CE + MSE.

Sequence plans are upstream BAGEL's (data/*.py at dbeaabb; reference/bagel.md §6.4), checked
against upstream's own output by tests/data/test_recipe_plans.py:
- t2i (``T2IIterableDataset``): one caption drawn per use (cfg-droppable) -> noised target image.
- edit (``UnifiedEditIterableDataset``): a chain of images; ``edit_chain`` below.
- interleaved: the row's parts in order with their own loss/VAE/ViT/cfg flags.
- vlm (``SftJSONLIterableDataset``): ``vlm_items`` below; nothing is cfg-droppable.
"""
from __future__ import annotations

from typing import Dict, List, Optional

from umm.data.datasets import Example
from umm.data.plan import ImageItem, PlanItem, TextItem
from umm.methods import DEFAULT_TRAINABLE
from umm.methods.base import (PlanContext, Planner, Recipe, condition_image, interleaved_items,
                              target_image, text)


def edit_chain(ctx: PlanContext, images: List, instructions: List[List[str]]) -> List[PlanItem]:
    """One use of an edit chain, drawn as upstream: a start image, an end 1 or 2 steps later; the
    start is the condition (clean VAE + ViT, droppable). When the span is 2 steps, half the time the
    instructions (one alternative drawn per step) are joined with ". " into one text before the end
    image (upstream then stops one image earlier when the span ends at the chain's last image);
    otherwise each step's instruction is followed by its image, generated, and intermediate images
    get droppable clean copies so the next step sees them."""
    n = len(images)
    start = ctx.rng.choice(range(n - 1))
    end = ctx.rng.choice(range(start + 1, min(start + 3, n)))
    items = condition_image(ctx, images[start], cfg=True)
    if end - start > 1 and ctx.rng.random() < 0.5:
        if end == n - 1:
            end -= 1
        joined = "".join(ctx.rng.choice(instructions[i - 1]) + ". " for i in range(start + 1, end + 1))
        return items + [text(ctx, joined.rstrip(), cfg=True), *target_image(ctx, images[end])]
    for i in range(start + 1, end + 1):
        items.append(text(ctx, ctx.rng.choice(instructions[i - 1]), cfg=True))
        items += target_image(ctx, images[i], visible_after=i != end)
    return items


def vlm_items(ctx: PlanContext, fields: Dict, think_drop: Optional[float] = None) -> List[PlanItem]:
    """A LLaVA conversation as upstream: human turns split at ``<image>`` (pieces stripped; the
    row's images in order, while there are any), gpt turns as they are with CE; texts that tokenize
    to nothing are left out. ``think_drop`` (UniCoT) makes the first ``think`` turn a gpt turn, or
    leaves it out with that probability; without it think turns are ignored, as BAGEL's loader does."""
    turns = list(fields["conversations"])
    if think_drop is not None:
        for i, turn in enumerate(turns):
            if turn["from"] == "think":
                turns[i:i + 1] = [] if ctx.rng.random() < think_drop else [{**turn, "from": "gpt"}]
                break
    images = fields["images"]
    items: List[PlanItem] = []

    def add_text(value: str, loss: bool) -> None:
        ids = ctx.ids(value, allow_empty=True)
        if ids:
            items.append(TextItem(ids=ids, loss=loss))

    for turn in turns:
        if turn["from"] == "gpt":
            add_text(turn["value"], True)
        elif turn["from"] == "human" and "<image>" not in turn["value"]:
            add_text(turn["value"], False)
        elif turn["from"] == "human":
            pieces = turn["value"].split("<image>")
            for i, piece in enumerate(pieces):
                if piece.strip():
                    add_text(piece.strip(), False)
                if i < len(pieces) - 1 and i < len(images):
                    items.append(ImageItem(image=ctx.vit(images[i], len(images)), role="vit"))
    return items


class SFTRecipe(Recipe):
    name = "sft"
    default_trainable = frozenset(DEFAULT_TRAINABLE["sft"])

    def planners(self) -> Dict[str, Planner]:
        return {"t2i": self.plan_t2i, "edit": self.plan_edit, "interleaved": self.plan_interleaved,
                "vlm": self.plan_vlm}

    def plan_t2i(self, example: Example, ctx: PlanContext) -> List[PlanItem]:
        caption = ctx.rng.choice(example.fields["caption"])  # drawn even for one caption, as upstream
        return [text(ctx, caption, cfg=True), *target_image(ctx, example.fields["image"])]

    def plan_edit(self, example: Example, ctx: PlanContext) -> List[PlanItem]:
        return edit_chain(ctx, example.fields["images"], example.fields["instructions"])

    def plan_interleaved(self, example: Example, ctx: PlanContext) -> List[PlanItem]:
        return interleaved_items(ctx, example.fields["parts"])

    def plan_vlm(self, example: Example, ctx: PlanContext) -> List[PlanItem]:
        return vlm_items(ctx, example.fields)


def build(cfg) -> SFTRecipe:
    return SFTRecipe(cfg)
