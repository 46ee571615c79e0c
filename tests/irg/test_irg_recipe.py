"""umm's synthetic IRG trajectories cut into learning modes: the right images, and only mode names as groups.

Upstream's own rows (the conversation layout) are checked against upstream's plans and packs in
tests/data/test_recipe_plans.py."""
import random

import pytest

from umm.config.schema import ImageTransformConfig, MethodConfig
from umm.data.datasets import Manifest
from umm.data.packing import SpecialTokens
from umm.data.synthetic import words as synthetic_words
from umm.data.synthetic_irg import MANIFEST, write_irg_dataset
from umm.data.synthetic_irg import words as irg_words
from umm.data.transforms import ImageTransform
from umm.methods import get_recipe
from umm.methods.base import PlanContext, RecipeError


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


def test_group_that_is_not_a_mode_is_refused(manifest):
    tok = Words()
    recipe = get_recipe(MethodConfig(name="irg_stage1", recipe="irg"))
    with pytest.raises(RecipeError, match="not a learning mode"):
        plan_mode(manifest, "full_learning", recipe, tok)
