"""Synthetic pictures: one flat-coloured shape on a plain white background, and a pixel classifier.

The renderer feeds the synthetic datasets and the tiny autoencoder's training; ``classify`` is
the "learning is real" check: it reads the colour from the hue of the saturated pixels and
the shape from how the mask fills its bounding box. Colours are spaced 60 degrees apart in hue
and shapes differ in fill ratio (square 1, circle pi/4, triangle and diamond 1/2) and in
top/bottom balance (a triangle points up), so both stay separable on blurry samples.
"""
from __future__ import annotations

import colorsys
import random
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np
from PIL import Image, ImageDraw

from umm.errors import UmmError

BACKGROUND = (255, 255, 255)

COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "yellow": (235, 215, 25),
    "green": (30, 170, 50),
    "cyan": (25, 195, 210),
    "blue": (35, 60, 220),
    "purple": (170, 40, 200),
}
SHAPES = ("circle", "square", "triangle", "diamond")

# A pixel belongs to the shape when it is this saturated and this bright (HSV, 0..1);
# white, grey and black backgrounds are all below the saturation bar.
_MIN_SATURATION = 0.35
_MIN_VALUE = 0.25
# Fraction of the image that must be shape pixels before a shape is named at all.
_MIN_AREA = 0.01


class ShapeError(UmmError, ValueError):
    """An unknown colour or shape name, or an impossible size."""


@dataclass(frozen=True)
class ShapeSpec:
    """Where and how big the shape is, in pixels of a ``size``-square canvas."""

    colour: str
    shape: str
    cx: float
    cy: float
    radius: float


def random_spec(colour: str, shape: str, size: int, rng: random.Random) -> ShapeSpec:
    """Half-width 22-36% of the canvas, centre jittered so the shape stays inside with a margin."""
    _check_names(colour, shape)
    radius = size * rng.uniform(0.22, 0.36)
    slack = size / 2 - radius - size * 0.04
    cx = size / 2 + rng.uniform(-slack, slack)
    cy = size / 2 + rng.uniform(-slack, slack)
    return ShapeSpec(colour, shape, cx, cy, radius)


def render(colour: str, shape: str, size: int = 64, seed: int = 0) -> Image.Image:
    """An RGB ``size`` x ``size`` picture; the same (colour, shape, size, seed) gives the same pixels."""
    if size < 16:
        raise ShapeError(f"image size {size} is too small to draw a shape; use at least 16 pixels")
    return render_spec(random_spec(colour, shape, size, random.Random(seed)), size)


def render_spec(spec: ShapeSpec, size: int) -> Image.Image:
    _check_names(spec.colour, spec.shape)
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    fill = COLOURS[spec.colour]
    x, y, r = spec.cx, spec.cy, spec.radius
    if spec.shape == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
    elif spec.shape == "square":
        draw.rectangle([x - r, y - r, x + r, y + r], fill=fill)
    elif spec.shape == "triangle":
        draw.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], fill=fill)
    else:  # diamond
        draw.polygon([(x, y - r), (x + r, y), (x, y + r), (x - r, y)], fill=fill)
    return img


def to_tensor(img: Image.Image):
    """PIL RGB -> float tensor ``[3, H, W]`` in [-1, 1] (the models' pixel range)."""
    import torch

    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def to_image(x) -> Image.Image:
    """Float tensor/array ``[3, H, W]`` in [-1, 1] -> PIL RGB (values clamped)."""
    arr = np.asarray(x.detach().cpu().float().numpy() if hasattr(x, "detach") else x, dtype=np.float32)
    arr = ((np.clip(arr, -1.0, 1.0) + 1.0) * 127.5).round().astype(np.uint8)
    return Image.fromarray(arr.transpose(1, 2, 0), "RGB")


def classify(image) -> Tuple[Optional[str], Optional[str]]:
    """(colour, shape) of the dominant saturated blob, or (None, None) when there is none.

    ``image`` is a PIL image or a ``[3, H, W]`` tensor in [-1, 1].
    """
    rgb = np.asarray((image if isinstance(image, Image.Image) else to_image(image)).convert("RGB"))
    hsv = np.asarray(Image.fromarray(rgb).convert("HSV"), dtype=np.float32) / 255.0
    hue, sat, val = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    mask = (sat >= _MIN_SATURATION) & (val >= _MIN_VALUE)
    if mask.mean() < _MIN_AREA:
        return None, None
    return _colour_of(hue[mask]), _shape_of(mask)


def _colour_of(hues: np.ndarray) -> str:
    """Each shape pixel votes for the palette colour nearest in hue (circular distance)."""
    names = list(COLOURS)
    ref = np.array([colorsys.rgb_to_hsv(*(c / 255 for c in COLOURS[n]))[0] for n in names])
    d = np.abs(hues[:, None] - ref[None, :])
    d = np.minimum(d, 1.0 - d)
    votes = np.bincount(d.argmin(axis=1), minlength=len(names))
    return names[int(votes.argmax())]


def _shape_of(mask: np.ndarray) -> str:
    # Bounding box of rows/columns that hold a real part of the shape (ignores stray pixels).
    rows = np.flatnonzero(mask.sum(axis=1) >= max(1, 0.1 * mask.sum(axis=1).max()))
    cols = np.flatnonzero(mask.sum(axis=0) >= max(1, 0.1 * mask.sum(axis=0).max()))
    box = mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    fill = box.mean()
    if fill > 0.9:
        return "square"
    if fill > 0.65:
        return "circle"
    half = box.shape[0] // 2
    top, bottom = box[:half].mean(), box[box.shape[0] - half :].mean()
    # An upward triangle puts ~1/4 of the box's top half and ~3/4 of its bottom half in the mask.
    return "triangle" if bottom > 1.6 * top else "diamond"


def _check_names(colour: str, shape: str) -> None:
    if colour not in COLOURS:
        raise ShapeError(f"unknown colour {colour!r}; choose one of {sorted(COLOURS)}")
    if shape not in SHAPES:
        raise ShapeError(f"unknown shape {shape!r}; choose one of {list(SHAPES)}")
