"""recA (reconstruction alignment, methods.md §1): the image's own ViT tokens condition the
generation of that same image; only the generation side trains, with the flow-matching loss alone.

Per picture (captions are ignored; rows of kind ``images``, ``t2i`` or ``edit`` (its last image)):

    [ViT image (no loss, never dropped)] [template text (cfg-droppable)] [noised VAE image (MSE)]

The template is ``method.template_prompt`` when set, else one of ``TEMPLATES`` per sample (upstream
draws from its own list of 364; these are ours). The ViT copy should be small (upstream: the
smallest understanding resolution, 224 px): it is an information bottleneck, without which the
model learns to copy pixels. Trainable parts: ``llm_gen`` and ``gen_heads``; the autoencoder, ViT,
connector, embeddings, lm_head and understanding expert get ``requires_grad=False``, so they receive
no gradient and no optimizer state (upstream detaches activations instead; same effect on the weights).
"""
from __future__ import annotations

from typing import Dict, List

from PIL import Image

from umm.data.datasets import Example
from umm.data.plan import ImageItem, PlanItem
from umm.methods import DEFAULT_TRAINABLE
from umm.methods.base import PlanContext, Planner, Recipe, target_image, text

# Plain words on purpose: the tiny model's word-level tokenizer knows them (umm/model/tiny.py).
TEMPLATES = (
    "what is in this image",
    "draw this image again",
    "the same picture",
    "every object in the image with its colour and shape",
    "make the image again",
    "show this picture",
)


def template_words() -> List[str]:
    """Words of the default templates (a word-level tokenizer must know them)."""
    return sorted({w for t in TEMPLATES for w in t.split()})


class RecARecipe(Recipe):
    name = "reca"
    default_trainable = frozenset(DEFAULT_TRAINABLE["reca"])

    def __init__(self, cfg):
        super().__init__(cfg)
        self.templates = list(TEMPLATES)  # one is drawn per sample (ctx.rng.choice), as upstream

    def planners(self) -> Dict[str, Planner]:
        return {"images": self._plan(lambda f: f["image"]), "t2i": self._plan(lambda f: f["image"]),
                "edit": self._plan(lambda f: f["images"][-1])}

    def _plan(self, picture) -> Planner:
        def planner(example: Example, ctx: PlanContext) -> List[PlanItem]:
            return self.reconstruction(picture(example.fields), ctx)
        return planner

    def reconstruction(self, image: Image.Image, ctx: PlanContext) -> List[PlanItem]:
        prompt = self.cfg.template_prompt or ctx.rng.choice(self.templates)
        return [ImageItem(image=ctx.vit(image), role="vit"), text(ctx, prompt, cfg=True),
                *target_image(ctx, image)]


def build(cfg) -> RecARecipe:
    return RecARecipe(cfg)
