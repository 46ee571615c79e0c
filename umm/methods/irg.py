"""IRG (Interleaving Reasoning Generation): one trajectory, six learning modes (reference/methods.md §2).

A trajectory is prompt → think → first image → reflection → improved image. Dataset rows of kind
``irg`` hold one trajectory as the five parts of the interleaved format, in that order
(umm/data/synthetic_irg.py writes them). The data config's group names are the learning modes: a
group named ``initial_full_learning`` turns each row into that mode's sequence, and its weight and
``is_mandatory`` set how often the mode is drawn (conf/data/irg_stage1.yaml mixes all six,
conf/data/irg_stage2.yaml the two full modes). Which parts carry loss follows the mode, not the
row's flags. Rows of kind ``interleaved`` (a mode already cut out, as upstream ships its data) are
planned as they stand.

Per mode (cond = input, no loss; target = loss; a cond image is a clean VAE latent then its ViT
copy, both cfg-droppable; a target image is a noised VAE latent with flow-matching loss):

| mode | sequence | CE on | MSE on |
|---|---|---|---|
| initial_thinking_understanding_learning | prompt · improved image · THINK_QUESTION → think | think | — |
| initial_thinking_generation_learning | prompt → think | think | — |
| initial_full_learning | prompt → think → first image | think | first image |
| improving_thinking_understanding_learning | prompt · first · improved · IMPROVE_QUESTION → reflection | reflection | — |
| improving_thinking_generation_learning | prompt · think · first image → reflection | reflection | — |
| improving_full_learning | prompt · think · first image → reflection → improved image | reflection | improved image |

Everything but the autoencoder trains (upstream IRG is a full fine-tune).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from PIL import Image

from umm.data.datasets import DataError, Example
from umm.data.plan import PlanItem
from umm.model.sampling import Context, ImageGenConfig
from umm.methods import DEFAULT_TRAINABLE
from umm.methods.base import (PlanContext, Planner, Recipe, RecipeError, condition_image,
                              interleaved_items, target_image, text)

# The user turns of the two understanding modes (upstream carries such questions in its data).
THINK_QUESTION = "what to draw"
IMPROVE_QUESTION = "what should change from the first image"

COND, TARGET = "cond", "target"

# mode -> the trajectory fields in sequence order with their role.
MODES: Dict[str, Tuple[Tuple[str, str], ...]] = {
    "initial_thinking_understanding_learning": (
        ("prompt", COND), ("improved", COND), ("think_question", COND), ("think", TARGET)),
    "initial_thinking_generation_learning": (("prompt", COND), ("think", TARGET)),
    "initial_full_learning": (("prompt", COND), ("think", TARGET), ("first", TARGET)),
    "improving_thinking_understanding_learning": (
        ("prompt", COND), ("first", COND), ("improved", COND), ("improve_question", COND), ("reflection", TARGET)),
    "improving_thinking_generation_learning": (
        ("prompt", COND), ("think", COND), ("first", COND), ("reflection", TARGET)),
    "improving_full_learning": (
        ("prompt", COND), ("think", COND), ("first", COND), ("reflection", TARGET), ("improved", TARGET)),
}
FULL_MODES = ("initial_full_learning", "improving_full_learning")

_PATTERN = ("text", "text", "image", "text", "image")


@dataclass
class Trajectory:
    prompt: str
    think: str
    first: Image.Image
    reflection: str
    improved: Image.Image
    think_question: str = THINK_QUESTION
    improve_question: str = IMPROVE_QUESTION


def trajectory_of(example: Example) -> Trajectory:
    """The five parts of an ``irg`` row, checked for the trajectory's order."""
    parts = example.fields["parts"]
    types = tuple(p["type"] for p in parts)
    if types != _PATTERN:
        raise DataError(
            example.source,
            f"an irg row must have the parts text(prompt), text(think), image(first), text(reflection), "
            f"image(improved) in this order; got {list(types)}",
            "bad_field",
        )
    return Trajectory(prompt=parts[0]["text"], think=parts[1]["text"], first=parts[2]["image"],
                      reflection=parts[3]["text"], improved=parts[4]["image"])


def mode_items(mode: str, traj: Trajectory, ctx: PlanContext) -> List[PlanItem]:
    """The plan items of ``mode`` for one trajectory, with that mode's loss mask."""
    items: List[PlanItem] = []
    for name, role in MODES[mode]:
        value = getattr(traj, name)
        if isinstance(value, str):
            # Every text may be dropped for classifier-free guidance, the target too, as upstream's rows
            # (MultiThinkInterleaveT2IDataset; IRG's run.sh sets text dropout 0).
            items.append(text(ctx, value, loss=role == TARGET, cfg=True))
        elif role == TARGET:
            items += target_image(ctx, value)
        else:
            items += condition_image(ctx, value, cfg=True)
    return items


class IRGRecipe(Recipe):
    name = "irg"
    default_trainable = frozenset(DEFAULT_TRAINABLE["irg"])

    def planners(self) -> Dict[str, Planner]:
        return {"irg": self.plan_irg, "interleaved": self.plan_interleaved}

    def plan_irg(self, example: Example, ctx: PlanContext) -> List[PlanItem]:
        if example.dataset not in MODES:
            raise RecipeError(
                f"irg dataset group data.datasets.{example.dataset} is not a learning mode; name the "
                f"groups of kind irg after the modes: {list(MODES)}"
            )
        return mode_items(example.dataset, trajectory_of(example), ctx)

    def plan_interleaved(self, example: Example, ctx: PlanContext) -> List[PlanItem]:
        return interleaved_items(ctx, example.fields["parts"])


def build(cfg) -> IRGRecipe:
    return IRGRecipe(cfg)


# ---- two-turn inference (reference/methods.md §2.9) -------------------------------------------------

FIRST_TURN = ImageGenConfig(cfg_text_scale=4.0, cfg_img_scale=1.0, cfg_interval=(0.4, 1.0), timestep_shift=3.0,
                            cfg_renorm_type="global")
SECOND_TURN = ImageGenConfig(cfg_text_scale=4.0, cfg_img_scale=2.0, cfg_interval=(0.0, 1.0), timestep_shift=3.0,
                             cfg_renorm_type="text_channel")


@dataclass
class TwoTurnSettings:
    """Guidance of each turn (defaults: upstream's). Turn 1 is plain text-to-image; turn 2 guides by
    text (the reflection) and by image (the first picture) in series, renorming the text step per token."""

    first: ImageGenConfig = field(default_factory=lambda: dataclasses.replace(FIRST_TURN))
    second: ImageGenConfig = field(default_factory=lambda: dataclasses.replace(SECOND_TURN))
    max_text_tokens: int = 64
    temperature: float = 0.0  # 0: greedy decoding


@dataclass
class TwoTurnResult:
    prompt: str
    think: str
    first: torch.Tensor  # [3, H, W] in [-1, 1]
    reflection: str
    improved: torch.Tensor
    # The generated token ids (the texts above are their decoding) and the generation context the
    # improved image was drawn after (a further turn continues from it).
    think_ids: List[int] = field(default_factory=list)
    reflection_ids: List[int] = field(default_factory=list)
    context: Optional[Context] = None


def two_turn(inferencer, prompt: str, *, size: Tuple[int, int], vit_transform, settings: TwoTurnSettings,
             generator=None) -> TwoTurnResult:
    """think → first image → read it back (VAE + ViT) → reflect → improved image.

    The contexts follow the training sequence of ``improving_full_learning`` (prompt · think ·
    first image as clean VAE latent then ViT · reflection → improved image). Guidance branches:
    turn 1 text-unconditional = the empty context; turn 2 text-unconditional = everything but the
    reflection, image-unconditional = the texts only (no first image). ``vit_transform`` turns the
    generated picture into the ViT's input as training did (``ImageTransform(data.vit_transform)``).
    """
    from umm.data.shapes import to_image

    inf, (height, width) = inferencer, size
    decode = inf.tokenizer.decode
    ctx = inf.add_text(inf.new_context(), prompt)
    think = inf.generate_text(ctx, settings.max_text_tokens, temperature=settings.temperature, generator=generator)
    inf.add_text(ctx, think)
    first = inf.generate_image(ctx, height, width, cfg_text_ctx=inf.new_context(), cfg_img_ctx=ctx,
                               config=settings.first, generator=generator)

    texts_only = ctx.clone()
    inf.add_image(ctx, first, vit_image=vit_transform(to_image(first)), generator=generator)
    without_reflection = ctx.clone()
    reflection = inf.generate_text(ctx, settings.max_text_tokens, temperature=settings.temperature,
                                   generator=generator)
    inf.add_text(ctx, reflection)
    inf.add_text(texts_only, reflection)
    improved = inf.generate_image(ctx, height, width, cfg_text_ctx=without_reflection, cfg_img_ctx=texts_only,
                                  config=settings.second, generator=generator)
    return TwoTurnResult(prompt=prompt, think=decode(think), first=first, reflection=decode(reflection),
                         improved=improved, think_ids=think, reflection_ids=reflection, context=ctx)
