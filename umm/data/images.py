"""Image files -> RGB pictures as they are meant to be seen: the one decoder every reader's rows use.

- Size first: ``Image.open`` reads only the header, so a picture of more than ``max_pixels``
  (``data.max_image_pixels``) is refused before any pixel is decoded (a 16k x 16k PNG costs its header).
- EXIF orientation is applied (phone photos are stored sideways with a rotate tag).
- High bit depth is mapped from its real range, not clipped at 255: 16-bit integers from 0..65535
  (32-bit ``I`` pictures holding values outside that from their own min..max); floats from 0..1,
  or from their own min..max when they leave it (NaN reads as the minimum).
- Transparency (RGBA, LA, PA, a palette with a transparent colour) is composited on white; every other
  mode (palette, CMYK, YCbCr, ...) is converted by PIL.

Errors are ``ImageDecodeError`` with a ``reason`` (``not_an_image``, ``corrupt_image``,
``image_too_large``); the dataset layer names the row.
"""
from __future__ import annotations

from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from umm.config.schema import DataConfig
from umm.errors import UmmError

DEFAULT_MAX_PIXELS = DataConfig.max_image_pixels
# Rows converted at a time for high-bit-depth pictures, so the float copy stays small.
_CHUNK_ROWS = 256


class ImageDecodeError(UmmError):
    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.message, self.reason = message, reason


def _range(image: Image.Image) -> tuple:
    """(low, high) of the values that map to 0 and 255."""
    if image.mode.startswith("I;16"):
        return 0.0, 65535.0
    low, high = image.getextrema()
    if image.mode == "I":
        return (0.0, 65535.0) if 0 <= low and high <= 65535 else (float(low), float(high))
    if 0 <= low and high <= 1:
        return 0.0, 1.0
    return float(low), float(high)


def _to_8bit(image: Image.Image) -> Image.Image:
    """A single-channel 16/32-bit integer or float picture as 8-bit grey, linear from its range."""
    low, high = _range(image)
    scale = 255.0 / (high - low) if high > low else 0.0
    out = np.empty((image.height, image.width), dtype=np.uint8)
    for top in range(0, image.height, _CHUNK_ROWS):
        rows = np.asarray(image.crop((0, top, image.width, min(top + _CHUNK_ROWS, image.height))), dtype=np.float32)
        rows = np.nan_to_num(rows, nan=low, posinf=high, neginf=low)
        out[top:top + len(rows)] = np.clip(np.rint((rows - low) * scale), 0, 255).astype(np.uint8)
    return Image.fromarray(out, mode="L")


def decode_image(handle: BinaryIO, what: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Fully decode ``handle`` (so a truncated file fails here, not later in a worker) into RGB."""
    try:
        with Image.open(handle) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise ImageDecodeError(
                    f"{what} is {width} x {height} = {width * height} pixels, over data.max_image_pixels="
                    f"{max_pixels} (refused before decoding; resize it, or raise the limit)", "image_too_large")
            image.load()
            ImageOps.exif_transpose(image, in_place=True)  # no copy unless it turns
            if image.mode in ("I", "F") or image.mode.startswith("I;16"):
                image = _to_8bit(image)
            if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
                rgba = image if image.mode == "RGBA" else image.convert("RGBA")
                out = Image.new("RGB", rgba.size, (255, 255, 255))
                out.paste(rgba.convert("RGB"), mask=rgba.getchannel("A"))  # over white, without RGBA copies
                return out
            return image.convert("RGB")
    except UnidentifiedImageError:
        raise ImageDecodeError(f"{what} is not an image file", "not_an_image") from None
    except Image.DecompressionBombError as exc:  # PIL's check in Image.open, for pictures over twice its limit
        raise ImageDecodeError(f"{what} is over data.max_image_pixels={max_pixels} and PIL's own limit ({exc}); "
                               "refused before decoding", "image_too_large") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError(f"{what} cannot be decoded ({exc})", "corrupt_image") from None
