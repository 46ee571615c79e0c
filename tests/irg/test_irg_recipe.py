"""umm's synthetic IRG trajectories cut into learning modes: each mode laid out as upstream's own rows
of that group, and only mode names as groups.

Upstream's own rows (the conversation layout) are checked against upstream's plans and packs in
tests/data/test_recipe_plans.py."""
import json
import random

import pytest

from umm.config.schema import ImageTransformConfig, MethodConfig
from umm.data.datasets import Manifest
from umm.data.packing import SpecialTokens
from umm.data.plan import TextItem
from umm.data.synthetic import words as synthetic_words
from umm.data.synthetic_irg import MANIFEST, write_irg_dataset
from umm.data.synthetic_irg import words as irg_words
from umm.data.transforms import ImageTransform
from umm.methods import get_recipe
from umm.methods.base import PlanContext, RecipeError
from umm.methods.irg import MODES

from tests.data.test_recipe_plans import ITEM_TYPE, VECTORS


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


@pytest.mark.parametrize("mode", sorted(MODES))
def test_synthetic_modes_lay_out_as_upstreams_own_rows(manifest, mode):
    """Each mode of a synthetic trajectory gives the item sequence (type, loss, CFG flag) that
    upstream's MultiThinkInterleaveT2IDataset yielded for its own row of that group (the vectors)."""
    upstream = json.loads((VECTORS / "plans.json").read_text())["recipes"]["irg"]["groups"][mode]["samples"]
    want = {tuple((i["type"], i["loss"], i["enable_cfg"]) for i in s["sequence_plan"]) for s in upstream}
    assert len(want) == 1, f"upstream's {mode} rows differ in layout: {want}"
    recipe = get_recipe(MethodConfig(name="irg_stage1", recipe="irg"))
    _, plan = plan_mode(manifest, mode, recipe, Words())
    got = tuple(("text" if isinstance(i, TextItem) else ITEM_TYPE[i.role], int(i.loss), int(i.enable_cfg))
                for i in plan.items)
    assert got == want.pop()


def test_group_that_is_not_a_mode_is_refused(manifest):
    tok = Words()
    recipe = get_recipe(MethodConfig(name="irg_stage1", recipe="irg"))
    with pytest.raises(RecipeError, match="not a learning mode"):
        plan_mode(manifest, "full_learning", recipe, tok)
