"""Shape pictures and the pixel classifier behind the "learning is real" check."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from umm.data.shapes import BACKGROUND, COLOURS, SHAPES, ShapeError, classify, render, to_image, to_tensor


def test_render_is_deterministic_and_plain():
    a, b, c = render("red", "circle", 64, seed=3), render("red", "circle", 64, seed=3), render("red", "circle", 64, seed=4)
    assert a.size == (64, 64) and a.mode == "RGB"
    assert np.array_equal(np.asarray(a), np.asarray(b)) and not np.array_equal(np.asarray(a), np.asarray(c))
    colours = {tuple(p) for p in np.asarray(a).reshape(-1, 3)}
    assert colours == {BACKGROUND, COLOURS["red"]}


@pytest.mark.parametrize("size", [32, 64, 128])
def test_classifier_is_exact_on_renders(size):
    wrong = [
        (c, s, seed, classify(render(c, s, size, seed)))
        for c, s in itertools.product(COLOURS, SHAPES)
        for seed in range(8)
        if classify(render(c, s, size, seed)) != (c, s)
    ]
    assert not wrong


def test_classifier_reads_colour_of_blurred_tensors():
    """Generated samples are blurry: colour must survive, and tensors in [-1, 1] are accepted."""
    hits = 0
    for i, (c, s) in enumerate(itertools.product(COLOURS, SHAPES)):
        blurred = render(c, s, 64, seed=i).filter(ImageFilter.GaussianBlur(2))
        colour, _ = classify(to_tensor(blurred))
        hits += colour == c
    assert hits == len(COLOURS) * len(SHAPES)


def test_blank_and_grey_images_have_no_shape():
    assert classify(Image.new("RGB", (64, 64), BACKGROUND)) == (None, None)
    assert classify(Image.new("RGB", (64, 64), (128, 128, 128))) == (None, None)


def test_tensor_round_trip():
    img = render("blue", "triangle", 64, seed=1)
    x = to_tensor(img)
    assert x.shape == (3, 64, 64) and x.min() >= -1 and x.max() <= 1
    assert np.array_equal(np.asarray(to_image(x)), np.asarray(img))
    assert to_image(torch.full((3, 4, 4), 5.0)).getpixel((0, 0)) == (255, 255, 255)  # clamped


def test_unknown_names_and_sizes_are_errors():
    with pytest.raises(ShapeError, match="unknown colour 'pink'"):
        render("pink", "circle")
    with pytest.raises(ShapeError, match="unknown shape 'star'"):
        render("red", "star")
    with pytest.raises(ShapeError, match="too small"):
        render("red", "circle", size=8)
