"""recA (reconstruction alignment, methods.md §1): the image's own ViT tokens condition the
generation of that same image; only the generation side trains, with the flow-matching loss alone.

Per picture (captions are ignored; rows of kind ``images``, ``t2i`` or ``edit`` (its last image)):

    [ViT image (no loss, never dropped)] [template text (cfg-droppable)] [noised VAE image (MSE)]

The template is ``method.template_prompt`` when set, else one line of ``method.templates_file`` drawn
per sample (default ``reca_templates.txt`` beside this file; upstream draws from its own list of 364,
these sentences are ours). The ViT copy should be small (upstream: the
smallest understanding resolution, 224 px): it is an information bottleneck, without which the
model learns to copy pixels. Trainable parts: ``llm_gen`` and ``gen_heads``; the autoencoder, ViT,
connector, embeddings, lm_head and understanding expert get ``requires_grad=False``, so they receive
no gradient and no optimizer state; ``method.freeze_und`` (on in conf/method/reca.yaml) also detaches
the understanding tokens' activations inside the forward, as upstream's ``--freeze_und``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

from PIL import Image

from umm.data.datasets import Example
from umm.data.plan import ImageItem, PlanItem
from umm.methods import DEFAULT_TRAINABLE
from umm.methods.base import PlanContext, Planner, Recipe, RecipeError, target_image, text

# Plain words on purpose: the tiny model's word-level tokenizer knows them (umm/model/tiny.py).
DEFAULT_TEMPLATES = Path(__file__).with_name("reca_templates.txt")


def read_templates(path: Optional[str] = None) -> List[str]:
    """Non-blank lines of a templates file (``None``: the default set)."""
    file = Path(path) if path else DEFAULT_TEMPLATES
    try:
        lines = [line.strip() for line in file.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"method.templates_file={file}: cannot read it ({e}); give a UTF-8 text file, "
                          "one template a line") from None
    templates = [line for line in lines if line]
    if not templates:
        raise RecipeError(f"method.templates_file={file} has no template; write one a line")
    return templates


def template_words() -> List[str]:
    """Words of the default templates (a word-level tokenizer must know them)."""
    return sorted({w for t in read_templates() for w in t.split()})


class RecARecipe(Recipe):
    name = "reca"
    default_trainable = frozenset(DEFAULT_TRAINABLE["reca"])

    def __init__(self, cfg):
        super().__init__(cfg)
        # One is drawn per sample (ctx.rng.choice), as upstream; a fixed prompt needs no file.
        self.templates = [] if cfg.template_prompt else read_templates(cfg.templates_file)

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
