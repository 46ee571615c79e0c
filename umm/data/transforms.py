"""Image transforms as upstream BAGEL's ``ImageTransform`` (reference/bagel.md §6.5).

One transform per role: the VAE side (stride 16 = AE downsample 8 × latent patch 2) and the ViT side
(stride 14 = patch size) each have their own ``ImageTransformConfig``. A transform resizes keeping the
aspect ratio so the long side is at most ``max_size`` and the short side at least ``min_size``, snaps
both sides to a multiple of the stride, and maps pixels to [-1, 1] (mean = std = 0.5).
"""
from __future__ import annotations

from typing import Tuple

import numpy as np
import torch
from PIL import Image

from umm.config.schema import ImageTransformConfig


def _snap(value: float, stride: int) -> int:
    return max(stride, int(round(value / stride) * stride))


def _scaled(width: int, height: int, scale: float, stride: int) -> Tuple[int, int]:
    # Upstream rounds to whole pixels first, then to the stride (both with Python's half-to-even
    # round): the two roundings can land one stride apart from a single rounding.
    return _snap(round(width * scale), stride), _snap(round(height * scale), stride)


def target_size(
    width: int, height: int, cfg: ImageTransformConfig, img_num: int = 1
) -> Tuple[int, int]:
    """(width, height) after resizing, both multiples of ``cfg.stride``: upstream's
    ``MaxLongEdgeMinShortEdgeResize`` step by step, so sizes (and pixels) match it exactly.

    ``cfg.max_pixels`` (divided by ``img_num``, the images of one VLM row) caps the area; like
    upstream, an over-large area is scaled by the area ratio itself (not its square root).
    """
    stride = cfg.stride
    scale = min(cfg.max_size / max(width, height), 1.0)
    scale = max(scale, cfg.min_size / min(width, height))
    new_w, new_h = _scaled(width, height, scale, stride)
    if cfg.max_pixels is not None and new_w * new_h > cfg.max_pixels / img_num:
        new_w, new_h = _scaled(new_w, new_h, cfg.max_pixels / img_num / (new_w * new_h), stride)
    # An extreme aspect ratio can push the long side past max_size after the min-size upscale.
    if max(new_w, new_h) > cfg.max_size:
        new_w, new_h = _scaled(new_w, new_h, cfg.max_size / max(new_w, new_h), stride)
    return new_w, new_h


def resize_factor(width: int, height: int, cfg: ImageTransformConfig) -> float:
    """How far the transform scales an image (>= 1): used to reject images far outside the limits."""
    new_w, new_h = target_size(width, height, cfg)
    factor = max(new_w / width, new_h / height, width / new_w, height / new_h)
    return float(factor)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float tensor [3, H, W] in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous().div_(127.5).sub_(1.0)


class ImageTransform:
    """Resize (bicubic, antialiased like upstream) to the stride grid, then normalise to [-1, 1]."""

    def __init__(self, cfg: ImageTransformConfig):
        if cfg.stride <= 0 or cfg.min_size <= 0 or cfg.max_size < cfg.min_size:
            raise ValueError(
                f"image transform needs stride > 0 and 0 < min_size <= max_size; got stride={cfg.stride}, "
                f"min_size={cfg.min_size}, max_size={cfg.max_size} (fix data.vae_transform / data.vit_transform)"
            )
        self.cfg = cfg

    @property
    def stride(self) -> int:
        return self.cfg.stride

    def __call__(self, image: Image.Image, img_num: int = 1) -> torch.Tensor:
        size = target_size(image.width, image.height, self.cfg, img_num)
        if size != image.size:
            image = image.resize(size, Image.BICUBIC, reducing_gap=None)
        return to_tensor(image)

    def num_tokens(self, tensor: torch.Tensor) -> int:
        """Tokens this (already transformed) image occupies: one per stride x stride cell."""
        return (tensor.shape[-2] // self.stride) * (tensor.shape[-1] // self.stride)
