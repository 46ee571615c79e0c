"""SFT and recA recipes: plans with upstream's flags, and what trains."""
import pytest
import torch

from tests.model.builders import random_latent, tiny_dims
from umm.data.packing import NO_DROPOUT, PackGeometry, pack
from umm.methods.base import RecipeError
from umm.methods.reca import read_templates
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
    assert tokenizer.decode(plan.items[1].ids) in read_templates()
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


def test_reca_templates_come_from_a_replaceable_file(synthetic_root, tokenizer, tmp_path):
    mine = tmp_path / "templates.txt"
    mine.write_text("\nshow this picture again\n\n")
    plan = plan_row(recipe_for("reca", templates_file=str(mine)), synthetic_root, "t2i", tokenizer=tokenizer)
    assert tokenizer.decode(plan.items[1].ids) == "show this picture again"
    with pytest.raises(RecipeError, match="method.templates_file=.*missing.txt: cannot read it"):
        recipe_for("reca", templates_file=str(tmp_path / "missing.txt"))


def _gen_grads(model, batch, latent, detach_hooks=False):
    """Gradients of the trainable (generation-side) weights for one forward/backward."""
    handles = []
    if detach_hooks:  # upstream's freeze_und detach points, applied to the und modules' outputs
        lm = model.language_model.model
        und = [lm.embed_tokens, lm.norm, model.connector]
        for layer in lm.layers:
            a = layer.self_attn
            und += [a.q_proj, a.k_proj, a.v_proj, a.o_proj, layer.mlp]
        handles = [m.register_forward_hook(lambda mod, args, out: out.detach()) for m in und]
    model.zero_grad()
    out = model(batch, latent, generator=torch.Generator().manual_seed(0))
    out.mse_per_token.mean().backward()
    for h in handles:
        h.remove()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_freeze_und_detaches_und_activations_as_upstream(synthetic_root, tokenizer):
    """An edit sample (clean source latent -> instruction text -> target): the text's und tokens attend
    to the clean generation tokens. With requires_grad only, the target's loss reaches the generation
    weights through those und tokens; upstream's freeze_und (a detach reference: hooks at its detach
    points) cuts that path, and method.freeze_und gives the same gradients."""
    plan = plan_row(recipe_for("sft"), synthetic_root, "edit", tokenizer=tokenizer)
    roles = [r for r, _, _ in describe(plan)]
    assert roles.index("vae_clean") < roles.index("text") < roles.index("vae_noised")
    batch = pack([plan], special=tokenizer.special, geometry=PackGeometry.from_dims(tiny_dims()),
                 generator=torch.Generator().manual_seed(0), cfg_dropout=NO_DROPOUT)
    model = tiny_bagel()
    torch.nn.init.normal_(model.llm2vae.weight, std=0.02)  # starts at zero: no gradient would reach the LLM
    latent = random_latent(batch, tiny_dims(), 0)
    grads = {}
    for freeze_und in (False, True):
        model = recipe_for("reca", freeze_und=freeze_und).prepare_model(model)
        grads[freeze_und] = _gen_grads(model, batch, latent)
    model = recipe_for("reca", freeze_und=False).prepare_model(model)
    reference = _gen_grads(model, batch, latent, detach_hooks=True)
    assert grads[True].keys() == reference.keys() == grads[False].keys()
    for name, g in reference.items():
        torch.testing.assert_close(grads[True][name], g, rtol=1e-5, atol=1e-7, msg=name)
    differ = [n for n in reference if not torch.allclose(grads[False][n], reference[n], rtol=1e-3, atol=1e-6)]
    assert any("_moe_gen" in n for n in differ), "requires_grad alone should leave a path through und tokens"
