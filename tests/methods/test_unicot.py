"""UniCoT: chain plans with the loss masks of methods.md §3.5, and LoRA through real peft."""
import random

import pytest
import torch

from umm.data.datasets import Manifest
from umm.methods.base import RecipeError

from .conftest import VAE, VIT, recipe_for, tiny_bagel, train_steps

LORA = dict(enabled=True, r=4, alpha=8, dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "q_proj_moe_gen", "k_proj_moe_gen",
                            "v_proj_moe_gen", "o_proj_moe_gen", "gate_proj", "up_proj", "down_proj"])


def _chain_plans(root, tokenizer, row=0, **method):
    """{'macro' | step index: plan} for one chain, by trying seeds until every view was drawn."""
    recipe = recipe_for("unicot", **method)
    example = Manifest("unicot", "unicot", "unicot.jsonl", root=root).read(row)
    views = {}
    for seed in range(200):
        ctx = recipe.context(example, rng=random.Random(seed), tokenizer=tokenizer, vae_transform=VAE,
                             vit_transform=VIT, max_resize_factor=8.0)
        plan = recipe.plan(example, ctx)
        texts = [tokenizer.decode(i.ids) for i in plan.items if hasattr(i, "ids")]
        key = "macro" if texts[1] == example.fields["plan"] else next(
            t for t, s in enumerate(example.fields["steps"]) if s["edit"] in texts)
        views.setdefault(key, (plan, texts))
        if len(views) == len(example.fields["steps"]) + 1:
            return example, views
    raise AssertionError(f"not every view was drawn: {sorted(views, key=str)}")


def test_chain_views_carry_loss_as_upstream(synthetic_root, tokenizer):
    """Upstream's MDP builders (mdp_dataset.py, methods.md §3.5) put MSE on the generated image of a
    step and CE on no text; their own rows are checked in tests/data/test_recipe_plans.py. Every view
    of a synthetic chain follows that rule; method.chain_text_loss (off by default) adds CE on texts."""
    _, views = _chain_plans(synthetic_root, tokenizer)
    for key, (plan, _) in views.items():
        losses = [(getattr(i, "role", "text"), i.loss) for i in plan.items if i.loss]
        assert losses and all(role == "vae_noised" for role, _ in losses), key
        assert all(i.loss for i in plan.items if getattr(i, "role", None) == "vae_noised"), key
    _, views = _chain_plans(synthetic_root, tokenizer, chain_text_loss=True)
    assert all(any(i.loss for i in plan.items if not hasattr(i, "role")) for plan, _ in views.values())


def test_lora_trains_only_adapters_of_both_experts(synthetic_root, tokenizer):
    pytest.importorskip("peft")
    from peft import PeftModel

    recipe = recipe_for("unicot", lora=LORA)
    assert recipe.trainable_parts() == set()
    model = recipe.prepare_model(tiny_bagel())
    assert isinstance(model, PeftModel)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    for target in ("self_attn.q_proj.", "self_attn.q_proj_moe_gen.", "self_attn.o_proj_moe_gen.",
                   "mlp.gate_proj.", "mlp_moe_gen.down_proj.", "vit_model.vision_model.encoder.layers.0.self_attn.v_proj."):
        assert any(target in n for n in trainable), target
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # With text CE: the tiny model's llm2vae starts at zero, so MSE alone gives the frozen-base LLM no gradient.
    example, views = _chain_plans(synthetic_root, tokenizer, chain_text_loss=True)
    losses = train_steps(model, [views[1][0], views["macro"][0]], tokenizer, steps=3)
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and moved <= set(trainable)
    assert any(".lora_A." in n for n in moved) and any(".lora_B." in n for n in moved)
    assert losses[-1] < losses[0]


def test_lora_config_errors():
    bad = dict(LORA, target_modules=["q_proj", "v_porj_moe_gen"])
    with pytest.raises(RecipeError, match="v_porj_moe_gen"):
        recipe_for("unicot", lora=bad).prepare_model(tiny_bagel())
    with pytest.raises(RecipeError, match="target_modules is empty"):
        recipe_for("unicot", lora=dict(LORA, target_modules=[])).prepare_model(tiny_bagel())


def test_full_finetune_without_lora():
    recipe = recipe_for("unicot", lora=dict(LORA, enabled=False))
    model = recipe.prepare_model(tiny_bagel())
    assert all(p.requires_grad for n, p in model.named_parameters() if not n.endswith("pos_embed.pos_embed"))


# LoRA parameters r x (in + out) per adapted Linear, written from BAGEL-7B-MoT's shapes (hidden 3584,
# MLP 18944, kv 512, 28 layers; SigLIP 1152, 26 layers) at upstream's r=256 (methods.md §3.4).
_R, _H, _I, _KV, _VH = 256, 3584, 18944, 512, 1152
_EFFECTIVE = 28 * _R * ((_H + _H) * 2 + (_H + _KV) + (_H + _I) * 4) + 26 * _R * (_VH + _VH) * 2
_INTENDED = _EFFECTIVE + 28 * _R * ((_H + _KV) + (_H + _I) * 2)


@pytest.mark.parametrize("method, expected", [("unicot", _INTENDED), ("unicot_released_targets", _EFFECTIVE)])
def test_lora_target_sets_train_upstreams_parameter_counts_on_the_7b_shapes(method, expected):
    """The intended set (comma restored) and the set upstream's typo leaves, through real peft on the
    7B module tree (meta tensors): 1.16 B and 0.81 B trainable parameters."""
    pytest.importorskip("peft")
    from tests.toolkit.test_compose import compose_root
    from umm.config import validate
    from umm.methods import get_recipe
    from umm.model.config import dims_from_build_config
    from umm.model.io import build_on_meta

    cfg = validate(compose_root(["pipeline=unicot", "model=bagel_7b_mot", f"method={method}"]))
    with torch.device("meta"):
        model = get_recipe(cfg.method).prepare_model(build_on_meta(dims_from_build_config(cfg.model)))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == expected
    assert round(trainable / 1e9, 2) == {"unicot": 1.16, "unicot_released_targets": 0.81}[method]
