"""Two-turn inference: its context is the improving_full_learning training sequence; the script's outputs."""
import json
import random

import torch
from PIL import Image

from umm.config.schema import ImageTransformConfig
from umm.data.packing import PackGeometry, pack
from umm.data.shapes import to_image
from umm.data.transforms import ImageTransform
from umm.methods.base import PlanContext
from umm.methods.irg import Trajectory, TwoTurnSettings, mode_items, two_turn
from umm.model.io import load_model_dir
from umm.model.sampling import Inferencer

from ..scripts import load_script

VAE = ImageTransform(ImageTransformConfig(stride=16, min_size=64, max_size=64))
VIT = ImageTransform(ImageTransformConfig(stride=14, min_size=56, max_size=56))


def test_turn_two_context_is_the_training_sequence(tiny_model):
    loaded = load_model_dir(tiny_model)
    inf = Inferencer.from_loaded(loaded)
    settings = TwoTurnSettings(max_text_tokens=6)
    for cfg in (settings.first, settings.second):
        cfg.num_timesteps = 2
    r = two_turn(inf, "a red circle", size=(64, 64), vit_transform=VIT, settings=settings,
                 generator=torch.Generator().manual_seed(0))
    assert r.first.shape == r.improved.shape == (3, 64, 64)

    # The same trajectory as a training sample of the improving_full_learning mode, packed. An
    # untrained model may emit tokens that do not survive decode -> encode, so texts map to the ids.
    tok = loaded.tokenizer
    generated = {r.think: r.think_ids, r.reflection: r.reflection_ids}

    class Generated:
        special = tok.special

        @staticmethod
        def encode(text):
            return generated[text] if text in generated else tok.encode(text)
    traj = Trajectory(prompt="a red circle", think=r.think, first=to_image(r.first), reflection=r.reflection,
                      improved=to_image(r.improved))
    ctx = PlanContext(tokenizer=Generated, vae_transform=VAE, vit_transform=VIT, rng=random.Random(0), source="test")
    items = mode_items("improving_full_learning", traj, ctx)
    geometry = PackGeometry.from_dims(loaded.bagel.dims)
    batch = pack([type("P", (), {"items": items, "source": "test"})()], special=tok.special, geometry=geometry)
    target_tokens = 4 * 4 + 2  # the improved image's latent tokens and its two markers
    assert r.context.length == batch.sequence_length - target_tokens
    # The target image sits at the RoPE position the inference context continues from.
    assert int(batch.packed_position_ids[-1]) == r.context.rope


def test_script_records_what_the_model_produced(tiny_model, tmp_path):
    """The script's PNG and results.json hold the trajectory a direct two_turn call with the same seed
    gives: the same texts, the same pixels, and the classifier's reading of the saved pictures."""
    import numpy as np

    from umm.data.shapes import classify

    script = load_script("irg_infer")
    out = tmp_path / "infer"
    prompts = ["a red circle", "a blue thing"]
    summary = script.main(["--model-dir", str(tiny_model), "--prompts", *prompts, "--steps", "2",
                           "--max-text-tokens", "4", "--seed", "5", "--out", str(out)])
    rows = json.loads((out / "results.json").read_text())["prompts"]
    assert [r["prompt"] for r in rows] == prompts

    inf = Inferencer.from_loaded(load_model_dir(tiny_model))
    settings = TwoTurnSettings(max_text_tokens=4)
    for cfg in (settings.first, settings.second):
        cfg.num_timesteps = 2
    saved = []
    for i, (prompt, row) in enumerate(zip(prompts, rows)):
        r = two_turn(inf, prompt, size=(64, 64), vit_transform=VIT, settings=settings,
                     generator=torch.Generator().manual_seed(5 + i))  # the script's seed per trajectory
        assert (row["think"], row["reflection"]) == (r.think, r.reflection)
        png = Image.open(out / f"{i:03d}_{prompt.replace(' ', '_')}.png").convert("RGB")
        assert png.size == (2 * 64 + 3 * 2, 64 + 2 * 2)  # first | improved, 2-px frame
        first, improved = png.crop((2, 2, 66, 66)), png.crop((68, 2, 132, 66))
        saved.append((first, improved))
        assert np.array_equal(np.asarray(first), np.asarray(to_image(r.first)))
        assert np.array_equal(np.asarray(improved), np.asarray(to_image(r.improved)))
        assert not np.array_equal(np.asarray(first), np.asarray(improved))  # turn 2 drew a new picture
    # Only the shape prompt is scored, by the classifier's reading of the pictures as saved.
    red = rows[0]
    assert "first_matches" not in rows[1]
    assert (red["first_reads_as"], red["improved_reads_as"]) == (list(classify(saved[0][0])), list(classify(saved[0][1])))
    assert red["first_matches"] == (tuple(red["first_reads_as"]) == ("red", "circle"))
    assert summary["first_turn_match_rate"] == float(red["first_matches"])
    assert summary["improved_match_rate"] == float(red["improved_matches"])
