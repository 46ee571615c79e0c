"""Draw planned samples on one PIL canvas: each sample a panel, its items in sequence order.

Images are drawn at the size they are trained at (after the transforms), framed in their role's
colour; texts are the decoded tokens, coloured by what they do in training (legend on top):
loss-carrying text in green, text and images that may be dropped for classifier-free guidance on an
orange ground, and items this draw dropped struck through in grey (they are not in the sequence).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple, Union

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

Color = Tuple[int, int, int]
PAD, GAP, FRAME = 12, 8, 3
BACKGROUND: Color = (255, 255, 255)
HEADER: Color = (225, 228, 235)
TEXT: Color = (20, 20, 20)
LOSS: Color = (0, 130, 40)
DROPPABLE: Color = (255, 214, 150)
DROPPED: Color = (150, 150, 150)
ROLES = {"vae_noised": ((220, 0, 0), "generated (noised VAE, MSE)"),
         "vae_clean": ((0, 90, 220), "clean VAE condition"),
         "vit": ((140, 0, 200), "ViT input")}


@dataclass
class TextPiece:
    text: str
    loss: bool
    droppable: bool
    dropped: bool


@dataclass
class ImagePiece:
    pixels: np.ndarray  # H x W x 3, uint8
    role: str
    droppable: bool
    dropped: bool


Piece = Union[TextPiece, ImagePiece]


@dataclass
class Panel:
    title: str
    pieces: List[Piece]


def _font(size: int = 14):
    try:
        return ImageFont.load_default(size=size)  # a scalable font (Pillow >= 10.1 with FreeType)
    except TypeError:
        return ImageFont.load_default()


class _Canvas:
    """Lays boxes left to right, wrapping to a new line at the canvas width; draws in a second pass."""

    def __init__(self, width: int, font):
        self.width, self.font = width, font
        self.line_height = font.getbbox("Ag")[3] + 4
        self.ops: List[Tuple[str, tuple]] = []
        self.x, self.y, self.row_height = PAD, PAD, 0

    def text_width(self, text: str) -> int:
        return int(self.font.getlength(text))

    def newline(self, gap: int = GAP) -> None:
        if self.x > PAD:
            self.y += self.row_height + gap
        self.x, self.row_height = PAD, 0

    def _place(self, w: int, h: int) -> Tuple[int, int]:
        if self.x > PAD and self.x + w > self.width - PAD:
            self.newline()
        at = (self.x, self.y)
        self.x += w + GAP
        self.row_height = max(self.row_height, h)
        return at

    def _wrap(self, text: str, width: int) -> List[str]:
        lines, line = [], ""
        for word in text.split():
            candidate = f"{line} {word}" if line else word
            if line and self.text_width(candidate) > width:
                lines.append(line)
                line = word
            else:
                line = candidate
        return lines + [line] if line else lines or [""]

    def bar(self, text: str) -> None:
        self.newline()
        self.ops.append(("bar", (self.y, text)))
        self.y += self.line_height + 2 * FRAME + GAP

    def text(self, piece: TextPiece) -> None:
        color = DROPPED if piece.dropped else LOSS if piece.loss else TEXT
        ground = DROPPABLE if piece.droppable else None
        usable = self.width - 2 * PAD - 2 * FRAME
        lines = self._wrap(piece.text, usable)
        w = max(self.text_width(line) for line in lines) + 2 * FRAME
        if len(lines) > 1:
            self.newline()
        at = self._place(w, len(lines) * self.line_height + 2 * FRAME)
        self.ops.append(("text", (at, w, lines, color, ground, piece.dropped)))
        if len(lines) > 1:
            self.newline()

    def image(self, piece: ImagePiece) -> None:
        h, w = piece.pixels.shape[:2]
        frame, name = ROLES[piece.role]
        label = f"{name} {w}x{h}" + (", dropped" if piece.dropped else ", droppable" if piece.droppable else "")
        box_w = max(w + 2 * FRAME, self.text_width(label))
        at = self._place(box_w, h + 2 * FRAME + self.line_height)
        self.ops.append(("image", (at, piece, frame, label)))

    def swatch(self, frame: Color, label: str) -> None:
        side = self.line_height
        at = self._place(side + GAP + self.text_width(label), side)
        self.ops.append(("swatch", (at, side, frame, label)))

    def height(self) -> int:
        self.newline()
        return self.y + PAD

    def draw(self, height: int) -> Image.Image:
        canvas = Image.new("RGB", (self.width, height), BACKGROUND)
        draw = ImageDraw.Draw(canvas)
        for op, args in self.ops:
            if op == "bar":
                y, text = args
                draw.rectangle([0, y, self.width, y + self.line_height + 2 * FRAME], fill=HEADER)
                draw.text((PAD, y + FRAME), text, fill=TEXT, font=self.font)
            elif op == "text":
                (x, y), w, lines, color, ground, dropped = args
                if ground is not None:
                    draw.rectangle([x, y, x + w, y + len(lines) * self.line_height + 2 * FRAME], fill=ground)
                for i, line in enumerate(lines):
                    top = y + FRAME + i * self.line_height
                    draw.text((x + FRAME, top), line, fill=color, font=self.font)
                    if dropped:
                        mid = top + self.line_height // 2
                        draw.line([x + FRAME, mid, x + FRAME + self.text_width(line), mid], fill=color, width=1)
            elif op == "swatch":
                (x, y), side, frame, label = args
                draw.rectangle([x, y, x + side - 1, y + side - 1], outline=frame, width=FRAME)
                draw.text((x + side + GAP, y + FRAME), label, fill=TEXT, font=self.font)
            else:
                (x, y), piece, frame, label = args
                h, w = piece.pixels.shape[:2]
                draw.rectangle([x, y, x + w + 2 * FRAME - 1, y + h + 2 * FRAME - 1], fill=frame)
                canvas.paste(Image.fromarray(piece.pixels, "RGB"), (x + FRAME, y + FRAME))
                top = y + h + 2 * FRAME
                if piece.droppable:
                    draw.rectangle([x, top, x + self.text_width(label), top + self.line_height], fill=DROPPABLE)
                draw.text((x, top), label, fill=DROPPED if piece.dropped else TEXT, font=self.font)
        return canvas


def _legend(canvas: _Canvas) -> None:
    canvas.text(TextPiece("legend:", False, False, False))
    canvas.text(TextPiece("text with loss (CE)", True, False, False))
    canvas.text(TextPiece("context text (no loss)", False, False, False))
    canvas.text(TextPiece("droppable for CFG", False, True, False))
    canvas.text(TextPiece("dropped in this draw", False, False, True))
    for frame, name in ROLES.values():
        canvas.swatch(frame, f"image frame: {name}")
    canvas.newline()


def render(panels: List[Panel], min_width: int = 960, font_size: int = 14) -> Image.Image:
    """The panels on one image, as wide as the widest image needs (at least ``min_width``)."""
    widest = max((p.pixels.shape[1] for panel in panels for p in panel.pieces if isinstance(p, ImagePiece)),
                 default=0)
    canvas = _Canvas(max(min_width, widest + 2 * (PAD + FRAME)), _font(font_size))
    _legend(canvas)
    for panel in panels:
        canvas.bar(panel.title)
        for piece in panel.pieces:
            (canvas.text if isinstance(piece, TextPiece) else canvas.image)(piece)
        canvas.newline(2 * GAP)
    return canvas.draw(canvas.height())


def to_pixels(image: torch.Tensor) -> np.ndarray:
    """A plan's image ([3, H, W] in [-1, 1]) as H x W x 3 uint8: the transform's normalisation undone."""
    return image.detach().float().add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
