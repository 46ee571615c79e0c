"""UniCoT (methods.md §3): macro-level planning and micro-level edit/evaluate steps, trained with
LoRA through peft (``method.lora``: r 256, alpha 512, dropout 0 by default) on frozen base weights;
with ``method.lora.enabled: false`` it is a full fine-tune (everything but the autoencoder), as the
paper's reported runs.

A chain row (kind ``unicot``, umm's own format, umm/data/datasets.py) becomes one sample per use: the
macro view with probability 1/(T+1), else micro step t (uniform). Upstream's released builders put
CE on no text of these rows (text supervision comes from VLM rows with a think role), so by default
only images carry loss; ``method.chain_text_loss: true`` adds CE on the texts marked (CE*) below, the
loss figure of the paper (methods.md §3.1), a deliberate difference kept off by default.

- macro: prompt -> plan (CE*) -> per step: its instruction and its summary (the step's own
  reasoning stays invisible here) -> final analysis (CE*) -> final image (MSE).
- micro step t, the MDP transition s_t -> s_t+1: prompt -> state s_t (its summary as text and its
  image as clean VAE + ViT; the first step of a chain without a start image has no state) ->
  instruction -> edit text (CE*) -> edited image (MSE, then clean VAE + ViT copies so what follows
  sees it) -> summary of s_t+1 (CE*) -> evaluation, the reward (CE*).

Rows of the SFT kinds (t2i, edit, interleaved, vlm) are planned as in SFT, so chains can be mixed with
generic data.
"""
from __future__ import annotations

from typing import Dict, List, Set

from umm.data.datasets import Example
from umm.data.plan import PlanItem
from umm.methods.base import PlanContext, Planner, RecipeError, condition_image, target_image, text
from umm.methods.sft import SFTRecipe, vlm_items
from umm.model.parts import set_trainable


class UniCoTRecipe(SFTRecipe):
    name = "unicot"

    def planners(self) -> Dict[str, Planner]:
        return {**super().planners(), "unicot": self.plan_chain, "mdp_t2i": self.plan_mdp_t2i,
                "mdp_edit": self.plan_mdp_edit, "mdp_geo": self.plan_mdp_geo}

    # ---- upstream's rows (mdp_dataset.py, vlm_dataset.py of the LoRA tree) ------------------------

    def plan_vlm(self, example: Example, ctx: PlanContext) -> List[PlanItem]:
        """A think turn trains as a gpt turn, or is left out with probability ``method.think_drop``."""
        return vlm_items(ctx, example.fields, think_drop=self.cfg.think_drop)

    @staticmethod
    def _texts(ctx: PlanContext, *values: str, loss: bool = False) -> List[PlanItem]:
        # Every MDP text is droppable for guidance (upstream's _add_text default), even with loss.
        return [text(ctx, v, loss=loss, cfg=True, allow_empty=True) for v in values]

    def plan_mdp_t2i(self, example: Example, ctx: PlanContext) -> List[PlanItem]:
        """Visual-state initialisation: system prompt, prompt, think (no loss) -> image (MSE)."""
        f = example.fields
        return [*self._texts(ctx, f["system_prompt"], f["prompt"], f["think"]), *target_image(ctx, f["image"])]

    def plan_mdp_edit(self, example: Example, ctx: PlanContext) -> List[PlanItem]:
        """Visual-state transition: texts (no loss) -> source image (clean VAE + ViT) -> edit
        instruction (no loss) -> target image (MSE)."""
        f = example.fields
        return [*self._texts(ctx, f["system_prompt"], f["prompt"], f["think"]),
                *condition_image(ctx, f["source_image"], cfg=True), *self._texts(ctx, f["edit_instruction"]),
                *target_image(ctx, f["target_image"])]

    def plan_mdp_geo(self, example: Example, ctx: PlanContext) -> List[PlanItem]:
        """Sequential decomposition: task -> first image -> (step-2/4: intermediate image) ->
        (step-3/4: reasoning text, CE) -> final image (MSE)."""
        f = example.fields
        items = [*self._texts(ctx, f["task"]), *condition_image(ctx, f["first"], cfg=True)]
        if f["middle"] is not None:
            items += condition_image(ctx, f["middle"], cfg=True)
        if f["task_type"] in ("step-3", "step-4"):
            items += self._texts(ctx, f["reasoning"], loss=True)
        return items + target_image(ctx, f["last"])

    # ---- what trains ---------------------------------------------------------------------------

    def trainable_parts(self) -> Set[str]:
        """With LoRA no base part trains (only the adapters); else as SFT."""
        return set() if self.cfg.lora.enabled else super().trainable_parts()

    def prepare_model(self, bagel):
        """Full fine-tune: freeze by part. LoRA: freeze every base weight and wrap in a peft model."""
        lora = self.cfg.lora
        if not lora.enabled:
            return super().prepare_model(bagel)
        if lora.r <= 0 or lora.alpha <= 0 or not 0 <= lora.dropout < 1:
            raise RecipeError(f"method.lora needs r > 0, alpha > 0, 0 <= dropout < 1; got r={lora.r}, "
                              f"alpha={lora.alpha}, dropout={lora.dropout}")
        targets = list(lora.target_modules)
        if not targets:
            raise RecipeError("method.lora.target_modules is empty; list the projections to adapt, e.g. "
                              "[q_proj, k_proj, v_proj, o_proj, q_proj_moe_gen, ...]")
        names = [name for name, _ in bagel.named_modules()]
        # peft matches a target by the end of the module name; a typo would silently adapt nothing.
        unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
        if unmatched:
            raise RecipeError(f"method.lora.target_modules {unmatched} match no module of the model "
                              "(names are matched by their last components, e.g. q_proj_moe_gen)")
        set_trainable(bagel, [])
        bagel.language_model.model.set_freeze_und(self.cfg.freeze_und)
        from peft import LoraConfig, get_peft_model  # slow import: only when LoRA is used

        config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                            target_modules=targets, bias="none")
        return get_peft_model(bagel, config)

    # ---- chains --------------------------------------------------------------------------------

    def plan_chain(self, example: Example, ctx: PlanContext) -> List[PlanItem]:
        steps = example.fields["steps"]
        choice = ctx.rng.randrange(len(steps) + 1)
        if choice == len(steps):
            return self.macro(example.fields, ctx)
        return self.micro(example.fields, choice, ctx)

    def macro(self, f: Dict, ctx: PlanContext) -> List[PlanItem]:
        ce = self.cfg.chain_text_loss
        items: List[PlanItem] = [text(ctx, f["prompt"], cfg=True), text(ctx, f["plan"], loss=ce)]
        for step in f["steps"]:
            items += [text(ctx, step["instruction"]), text(ctx, step["summary"])]
        items.append(text(ctx, f["final"], loss=ce))
        items += target_image(ctx, f["steps"][-1]["image"])
        return items

    def micro(self, f: Dict, t: int, ctx: PlanContext) -> List[PlanItem]:
        steps = f["steps"]
        step = steps[t]
        items: List[PlanItem] = [text(ctx, f["prompt"], cfg=True)]
        if t > 0:
            items.append(text(ctx, steps[t - 1]["summary"]))
            items += condition_image(ctx, steps[t - 1]["image"], cfg=True)
        elif f["image"] is not None:
            items += condition_image(ctx, f["image"], cfg=True)
        items.append(text(ctx, step["instruction"], cfg=True))
        ce = self.cfg.chain_text_loss
        items.append(text(ctx, step["edit"], loss=ce))
        items += target_image(ctx, step["image"], visible_after=True)
        items += [text(ctx, step["summary"], loss=ce), text(ctx, step["evaluation"], loss=ce)]
        return items


def build(cfg) -> UniCoTRecipe:
    return UniCoTRecipe(cfg)
