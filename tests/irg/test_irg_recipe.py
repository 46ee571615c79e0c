"""The six IRG learning modes: sequence order and exact loss masks, checked through real packing."""
import random

import pytest

from umm.config.schema import ImageTransformConfig, MethodConfig
from umm.data.datasets import Manifest
from umm.data.packing import PackGeometry, SpecialTokens, pack
from umm.data.synthetic import words as synthetic_words
from umm.data.synthetic_irg import MANIFEST, write_irg_dataset
from umm.data.synthetic_irg import words as irg_words
from umm.data.transforms import ImageTransform
from umm.methods import get_recipe
from umm.methods.base import PlanContext, RecipeError
from umm.methods.irg import FULL_MODES, IMPROVE_QUESTION, MODES, THINK_QUESTION


class Words:
    """Whitespace tokenizer over the synthetic vocabulary (the tiny model's tokenizer is word level too)."""

    def __init__(self):
        vocab = sorted(set(synthetic_words()) | set(irg_words()) | {"a"})
        self.ids = {w: i for i, w in enumerate(vocab)}
        self.words = {i: w for w, i in self.ids.items()}
        n = len(vocab)
        self.special = SpecialTokens(bos=n, eos=n + 1, vision_start=n + 2, vision_end=n + 3)

    def encode(self, text):
        return [self.ids[w] for w in text.split()]  # KeyError = a word outside the vocabulary

    def decode(self, ids):
        return " ".join(self.words[i] for i in ids)


GEOMETRY = PackGeometry(vit_patch_size=14, vit_max_num_patch_per_side=8, latent_downsample=16, max_latent_size=8)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("irg")
    write_irg_dataset(root / "irg", num=4, size=64, seed=0)
    return root


def plan_mode(root, mode, recipe, tok):
    example = Manifest(mode, "irg", f"irg/{MANIFEST}", root=str(root)).read(0)
    ctx = PlanContext(tokenizer=tok, rng=random.Random(0), source=example.source,
                      vae_transform=ImageTransform(ImageTransformConfig(stride=16, min_size=64, max_size=64)),
                      vit_transform=ImageTransform(ImageTransformConfig(stride=14, min_size=56, max_size=56)))
    return example, recipe.plan(example, ctx)


def describe(plan, tok):
    """(what, loss, cfg) per item; texts decoded."""
    out = []
    for item in plan.items:
        what = tok.decode(item.ids) if hasattr(item, "ids") else item.role
        out.append((what, item.loss, item.enable_cfg))
    return out


def test_each_mode_has_its_sequence_and_loss_mask(manifest):
    tok = Words()
    recipe = get_recipe(MethodConfig(name="irg_stage1", recipe="irg", stage="stage1"))
    example, _ = plan_mode(manifest, "initial_full_learning", recipe, tok)
    prompt, think, _, reflection, _ = [p.get("text") for p in example.fields["parts"]]
    cond_image = [("vae_clean", False, True), ("vit", False, True)]
    target_image = [("vae_noised", True, False)]
    expected = {
        "initial_thinking_understanding_learning":
            [(prompt, False, True), *cond_image, (THINK_QUESTION, False, True), (think, True, False)],
        "initial_thinking_generation_learning": [(prompt, False, True), (think, True, False)],
        "initial_full_learning": [(prompt, False, True), (think, True, False), *target_image],
        "improving_thinking_understanding_learning":
            [(prompt, False, True), *cond_image, *cond_image, (IMPROVE_QUESTION, False, True), (reflection, True, False)],
        "improving_thinking_generation_learning":
            [(prompt, False, True), (think, False, True), *cond_image, (reflection, True, False)],
        "improving_full_learning":
            [(prompt, False, True), (think, False, True), *cond_image, (reflection, True, False), *target_image],
    }
    assert set(expected) == set(MODES)
    for mode, items in expected.items():
        _, plan = plan_mode(manifest, mode, recipe, tok)
        assert describe(plan, tok) == items, mode


def test_understanding_modes_condition_on_the_right_images(manifest):
    """initial-understanding sees the improved image; improving-understanding sees first then improved."""
    tok = Words()
    recipe = get_recipe(MethodConfig(name="irg_stage1", recipe="irg"))
    example, plan = plan_mode(manifest, "improving_thinking_understanding_learning", recipe, tok)
    first, improved = example.fields["parts"][2]["image"], example.fields["parts"][4]["image"]
    vae = [item.image for item in plan.items if getattr(item, "role", None) == "vae_clean"]
    from umm.data.transforms import to_tensor
    assert (vae[0] - to_tensor(first)).abs().max() < 0.02
    assert (vae[1] - to_tensor(improved)).abs().max() < 0.02
    _, plan = plan_mode(manifest, "initial_thinking_understanding_learning", recipe, tok)
    only = [item.image for item in plan.items if getattr(item, "role", None) == "vae_clean"]
    assert (only[0] - to_tensor(improved)).abs().max() < 0.02


def test_packed_losses_cover_only_the_targets(manifest):
    """Real packing: CE tokens = target text + <|im_end|> (+ bos), MSE tokens = one 4x4-latent image."""
    tok = Words()
    recipe = get_recipe(MethodConfig(name="irg_stage2", recipe="irg"))
    for mode in FULL_MODES:
        example, plan = plan_mode(manifest, mode, recipe, tok)
        batch = pack([plan], special=tok.special, geometry=GEOMETRY)
        target = example.fields["parts"][1 if mode == "initial_full_learning" else 3]["text"]
        assert batch.ce_loss_indexes.numel() == len(target.split()) + 1  # <|im_start|> + words
        assert tok.decode(batch.packed_label_ids[:-1].tolist()) == target
        assert batch.packed_label_ids[-1].item() == tok.special.eos
        assert batch.mse_loss_indexes.numel() == 16


def test_group_that_is_not_a_mode_is_refused(manifest):
    tok = Words()
    recipe = get_recipe(MethodConfig(name="irg_stage1", recipe="irg"))
    with pytest.raises(RecipeError, match="not a learning mode"):
        plan_mode(manifest, "full_learning", recipe, tok)
