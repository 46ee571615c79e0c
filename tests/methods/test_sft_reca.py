"""SFT and recA recipes: plans with upstream's flags, and what trains."""
import pytest
import torch

from umm.data.packing import NO_DROPOUT, pack
from umm.methods.base import RecipeError
from umm.methods.reca import TEMPLATES
from umm.model.parts import PARTS, part_of

from tests.data.conftest import GEOMETRY

from .conftest import describe, plan_row, recipe_for, tiny_bagel, train_steps


def test_sft_plans_follow_upstream_datasets(synthetic_root, tokenizer):
    sft = recipe_for("sft")
    assert describe(plan_row(sft, synthetic_root, "t2i")) == [("text", False, True), ("vae_noised", True, False)]
    assert describe(plan_row(sft, synthetic_root, "edit")) == [
        ("vae_clean", False, True), ("vit", False, True), ("text", False, True), ("vae_noised", True, False)]
    # draw -> image (loss, then clean copies) -> question -> answer (loss) -> instruction -> image (loss)
    assert describe(plan_row(sft, synthetic_root, "interleaved")) == [
        ("text", False, True), ("vae_noised", True, False), ("vae_clean", False, False), ("vit", False, False),
        ("text", False, False), ("text", True, False), ("text", False, True), ("vae_noised", True, False)]
    vlm = plan_row(sft, synthetic_root, "vlm")
    assert describe(vlm) == [("vit", False, False), ("text", False, False), ("text", True, False),
                             ("text", False, False), ("text", True, False)]
    assert vlm.source.startswith("vlm:") and vlm.source.endswith("vlm.jsonl:1")


def test_sft_vlm_answer_is_the_ce_target(synthetic_root, tokenizer):
    plan = plan_row(recipe_for("sft"), synthetic_root, "vlm", tokenizer=tokenizer)
    batch = pack([plan], special=tokenizer.special, geometry=GEOMETRY, cfg_dropout=NO_DROPOUT)
    labels = tokenizer.decode(batch.packed_label_ids.tolist())
    colour, shape = plan.items[2].ids, plan.items[4].ids
    assert labels.split() == [tokenizer.decode(colour), tokenizer.decode(shape)]
    assert batch.mse_loss_indexes.numel() == 0


def test_sft_trains_everything_but_the_autoencoder(tokenizer):
    model = recipe_for("sft").prepare_model(tiny_bagel())
    trainable = {part_of(n) for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(PARTS)
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.endswith("pos_embed.pos_embed"))


def test_unknown_part_is_a_clear_error():
    with pytest.raises(RecipeError, match="unknown parts \\['llm'\\]"):
        recipe_for("sft", trainable=["llm"])


def test_reca_plan_conditions_on_the_images_own_vit_tokens(synthetic_root, tokenizer):
    reca = recipe_for("reca")
    plan = plan_row(reca, synthetic_root, "t2i", tokenizer=tokenizer)
    assert describe(plan) == [("vit", False, False), ("text", False, True), ("vae_noised", True, False)]
    assert tokenizer.decode(plan.items[1].ids) in TEMPLATES
    vit, target = plan.items[0].image, plan.items[2].image
    # Same picture: the ViT copy is the target resized to the ViT grid.
    small = torch.nn.functional.interpolate(target[None], size=vit.shape[-2:], mode="area")[0]
    assert (small - vit).abs().mean() < 0.05
    fixed = recipe_for("reca", template_prompt="show this picture")
    assert tokenizer.decode(plan_row(fixed, synthetic_root, "t2i").items[1].ids) == "show this picture"


def test_reca_templates_are_in_the_tiny_vocabulary():
    from umm.methods.reca import template_words
    from umm.model.tiny import vocabulary

    assert set(template_words()) <= set(vocabulary())


def test_reca_trains_only_the_generation_side(synthetic_root, tokenizer):
    reca = recipe_for("reca")
    model = reca.prepare_model(tiny_bagel())
    assert reca.trainable_parts() == {"llm_gen", "gen_heads"}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    plans = [plan_row(reca, synthetic_root, "t2i", row=r, tokenizer=tokenizer) for r in range(3)]
    train_steps(model, plans, tokenizer)
    for name, p in model.named_parameters():
        frozen = part_of(name) not in {"llm_gen", "gen_heads"} or name.endswith("pos_embed.pos_embed")
        if frozen:
            assert p.grad is None and torch.equal(p, before[name]), name
        elif p.numel() > 1:
            assert not torch.equal(p, before[name]), f"{name} did not move"
