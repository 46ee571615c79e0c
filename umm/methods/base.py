"""What every recipe shares: which parts train, freezing, and the pieces a sequence plan is built from.

A recipe (one file per method) subclasses ``Recipe`` and supplies a planner per dataset kind it
accepts: ``plan(example, ctx)`` turns a decoded row into a ``SamplePlan`` (umm/data/plan.py). All
randomness in a planner must come from ``ctx.rng``: it is derived from (seed, dataset, epoch, row),
which is what makes the data stream reproducible and resumable.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable, Dict, FrozenSet, List, Sequence, Set, Tuple

from PIL import Image

from umm.config.schema import MethodConfig
from umm.data.datasets import DataError, Example
from umm.data.packing import CfgDropout
from umm.data.plan import ImageItem, PlanItem, SamplePlan, TextItem
from umm.data.transforms import ImageTransform, resize_factor
from umm.errors import UmmError
from umm.model.parts import PARTS, set_trainable

ALL_PARTS: Tuple[str, ...] = PARTS


class RecipeError(UmmError, ValueError):
    """A method config the recipe cannot run (unknown part, bad LoRA settings, ...)."""


@dataclass
class PlanContext:
    """Everything a planner needs for one sample."""

    tokenizer: Any  # .encode(str) -> list[int]
    vae_transform: ImageTransform
    vit_transform: ImageTransform
    rng: random.Random
    source: str
    max_resize_factor: float = 8.0

    def ids(self, text: str, allow_empty: bool = False) -> List[int]:
        ids = list(self.tokenizer.encode(text))
        if not ids and not allow_empty:
            raise DataError(self.source, f"text {text!r:.60} tokenizes to nothing", "empty_text")
        return ids

    def _image(self, image: Image.Image, transform: ImageTransform, role: str, img_num: int = 1):
        factor = resize_factor(image.width, image.height, transform.cfg)
        if factor > self.max_resize_factor:
            raise DataError(
                self.source,
                f"{image.width}x{image.height} image is far outside the {role} size limits "
                f"[{transform.cfg.min_size}, {transform.cfg.max_size}] (resize by {factor:.1f}x > "
                f"data.max_resize_factor={self.max_resize_factor})",
                "image_size",
            )
        return transform(image, img_num)

    def vae(self, image: Image.Image):
        return self._image(image, self.vae_transform, "VAE")

    def vit(self, image: Image.Image, img_num: int = 1):
        """``img_num``: images of the row, sharing the transform's ``max_pixels`` (upstream's VLM rule)."""
        return self._image(image, self.vit_transform, "ViT", img_num)


# ---- plan items ------------------------------------------------------------------------------

def text(ctx: PlanContext, value: str, *, loss: bool = False, cfg: bool = False, allow_empty: bool = False) -> TextItem:
    return TextItem(ids=ctx.ids(value, allow_empty), loss=loss, enable_cfg=cfg)


def image_items(ctx: PlanContext, image: Image.Image, *, loss: bool, vae: bool, vit: bool,
                cfg: bool = True) -> List[PlanItem]:
    """One image as upstream's ``_add_image``: a noised VAE latent when it is generated (``loss``;
    never droppable), then a clean VAE latent (``vae``), then its ViT copy (``vit``); the clean copies
    are droppable for classifier-free guidance when ``cfg``. After a generated image the clean copies
    share its RoPE id, so what follows sees the image (later items cannot see noised latents)."""
    items: List[PlanItem] = []
    if loss:
        items.append(ImageItem(image=ctx.vae(image), role="vae_noised", loss=True))
    if vae:
        items.append(ImageItem(image=ctx.vae(image), role="vae_clean", enable_cfg=cfg))
    if vit:
        items.append(ImageItem(image=ctx.vit(image), role="vit", enable_cfg=cfg))
    return items


def condition_image(ctx: PlanContext, image: Image.Image, *, vae: bool = True, vit: bool = True,
                    cfg: bool = True) -> List[PlanItem]:
    """A conditioning image as upstream: clean VAE latent first, then the ViT copy."""
    return image_items(ctx, image, loss=False, vae=vae, vit=vit, cfg=cfg)


def target_image(ctx: PlanContext, image: Image.Image, *, visible_after: bool = False) -> List[PlanItem]:
    """A generated image (flow-matching loss); with ``visible_after`` (the sequence goes on) its clean
    VAE and ViT copies follow, droppable as upstream's intermediate images."""
    return image_items(ctx, image, loss=True, vae=visible_after, vit=visible_after)


def interleaved_items(ctx: PlanContext, parts: Sequence[Dict[str, Any]]) -> List[PlanItem]:
    """Parts of an ``interleaved`` row (umm/data/datasets.py) in order, with their own loss, VAE/ViT
    and cfg flags (the row's layout has already resolved its defaults)."""
    items: List[PlanItem] = []
    for part in parts:
        if part["type"] == "text":
            items.append(text(ctx, part["text"], loss=part["loss"], cfg=part["cfg"]))
        else:
            items += image_items(ctx, part["image"], loss=part["loss"], vae=part["vae"], vit=part["vit"],
                                 cfg=part["cfg"])
    return items


# ---- the recipe --------------------------------------------------------------------------------

Planner = Callable[[Example, PlanContext], List[PlanItem]]


class Recipe:
    """Base recipe. Subclasses set ``name``, ``default_trainable`` and ``planners`` (kind -> method)."""

    name: str = "base"
    default_trainable: FrozenSet[str] = frozenset()

    def __init__(self, cfg: MethodConfig):
        self.cfg = cfg
        unknown = sorted(set(cfg.trainable) - set(ALL_PARTS))
        if unknown:
            raise RecipeError(f"method.trainable has unknown parts {unknown}; part names are {list(ALL_PARTS)}")

    # Subclasses fill this: {kind: bound planner}.
    def planners(self) -> Dict[str, Planner]:
        raise NotImplementedError

    @property
    def kinds(self) -> Tuple[str, ...]:
        return tuple(sorted(self.planners()))

    @property
    def cfg_dropout(self) -> CfgDropout:
        return CfgDropout(self.cfg.text_cond_dropout_prob, self.cfg.vit_cond_dropout_prob,
                          self.cfg.vae_cond_dropout_prob)

    def context(self, example: Example, *, rng: random.Random, tokenizer, vae_transform: ImageTransform,
                vit_transform: ImageTransform, max_resize_factor: float) -> PlanContext:
        return PlanContext(tokenizer=tokenizer, vae_transform=vae_transform, vit_transform=vit_transform,
                           rng=rng, source=example.source, max_resize_factor=max_resize_factor)

    def trainable_parts(self) -> Set[str]:
        return set(self.cfg.trainable) if self.cfg.trainable else set(self.default_trainable)

    def prepare_model(self, bagel):
        """Freeze every parameter outside the trainable parts; returns the module to optimise."""
        set_trainable(bagel, self.trainable_parts())
        bagel.language_model.model.set_freeze_und(self.cfg.freeze_und)
        return bagel

    def plan(self, example: Example, ctx: PlanContext) -> SamplePlan:
        planner = self.planners().get(example.kind)
        if planner is None:
            raise RecipeError(
                f"recipe {self.name!r} does not accept dataset kind {example.kind!r} (dataset "
                f"{example.dataset!r}); it accepts {list(self.kinds)}"
            )
        items = planner(example, ctx)
        if not any(item.loss for item in items):
            raise DataError(example.source, "the sample has no item with loss", "no_loss")
        return SamplePlan(items=items, source=f"{example.dataset}:{example.source}")
