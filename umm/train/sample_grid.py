"""The sample grid: one cell per sample, its images side by side with its text written under them.

A cell has two image slots (t2i: the generated image; edit: source then result; vlm: the image)
and ``TEXT_LINES`` lines of text (the prompt, instruction or question, and a VLM's answer), so every
cell has one size and a grid of ``n`` cells is ``min(n, COLUMNS)`` cells wide.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from PIL import Image, ImageDraw, ImageFont

COLUMNS = 4
PAD = 4
TEXT_LINES = 6
LINE_HEIGHT = 12
# Image slots are at least this wide, so a tiny model's 64 px images leave room for text.
MIN_SLOT = 96
MAX_SLOT = 384


@dataclass
class Cell:
    images: List[Image.Image]
    lines: List[str]


def slot_size(image_size: int) -> int:
    return min(max(int(image_size), MIN_SLOT), MAX_SLOT)


def cell_size(image_size: int) -> Tuple[int, int]:
    slot = slot_size(image_size)
    return 2 * slot + 3 * PAD, slot + 2 * PAD + TEXT_LINES * LINE_HEIGHT + PAD


def _fit(image: Image.Image, slot: int) -> Image.Image:
    scale = slot / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.NEAREST if scale >= 1 else Image.BICUBIC)


def _wrap(lines: Sequence[str], width_px: int, font) -> List[str]:
    """Greedy word wrap by measured width; a word wider than the cell is cut; at most TEXT_LINES."""
    out: List[str] = []
    for line in lines:
        current = ""
        for word in line.split() or [""]:
            candidate = f"{current} {word}" if current else word
            if font.getlength(candidate) <= width_px or not current:
                current = candidate
            else:
                out.append(current)
                current = word
            while font.getlength(current) > width_px and len(current) > 1:  # one over-long word
                cut = len(current) - 1
                while cut > 1 and font.getlength(current[:cut]) > width_px:
                    cut -= 1
                out.append(current[:cut])
                current = current[cut:]
        out.append(current)
    if len(out) > TEXT_LINES:
        out = out[:TEXT_LINES]
        while out[-1] and font.getlength(out[-1] + "...") > width_px:
            out[-1] = out[-1][:-1]
        out[-1] += "..."
    return out


def render(cells: Sequence[Cell], image_size: int, font: Optional[ImageFont.ImageFont] = None) -> Image.Image:
    """The grid as one RGB image (white background, black text)."""
    font = font or ImageFont.load_default()
    slot = slot_size(image_size)
    cw, ch = cell_size(image_size)
    cols = min(len(cells), COLUMNS)
    rows = math.ceil(len(cells) / COLUMNS)
    grid = Image.new("RGB", (cols * cw, rows * ch), "white")
    draw = ImageDraw.Draw(grid)
    for i, cell in enumerate(cells):
        r, c = divmod(i, COLUMNS)
        x0, y0 = c * cw, r * ch
        for k, image in enumerate(cell.images[:2]):
            grid.paste(_fit(image, slot), (x0 + PAD + k * (slot + PAD), y0 + PAD))
        y = y0 + slot + 2 * PAD
        for line in _wrap(cell.lines, cw - 2 * PAD, font):
            draw.text((x0 + PAD, y), line, fill="black", font=font)
            y += LINE_HEIGHT
        draw.rectangle((x0, y0, x0 + cw - 1, y0 + ch - 1), outline=(200, 200, 200))
    return grid
