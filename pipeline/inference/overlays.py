"""Overlay images to look at: ground-truth, coarse, refined (and snapped) boxes drawn on the image, with a legend."""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

# Boxes as xyxy pixel rows: a list of 4-sequences or an N x 4 tensor.
Boxes = Sequence[Sequence[float]] | Tensor
Font = ImageFont.ImageFont | ImageFont.FreeTypeFont

GT_COLOUR = (0, 220, 0)  # green
COARSE_COLOUR = (255, 140, 0)  # orange, dashed
REFINED_COLOUR = (0, 190, 255)  # cyan
SNAP_COLOUR = (255, 230, 0)  # yellow: zero-shot HQ-SAM snap, beside the refiner
LEGEND = (("ground truth", GT_COLOUR), ("coarse", COARSE_COLOUR), ("refined", REFINED_COLOUR))
LEGEND_BACKGROUND = (0, 0, 0, 170)  # dark and semi-opaque: boxes under the strip stay visible

# Line width from the shorter image side: 1 px at 300 px, 4 px at 900 px.
LINE_PER_PIXEL = 1 / 250
# Font size from the shorter image side, kept readable from 300 px to 900 px images (and a bit beyond).
FONT_PER_PIXEL = 1 / 28
MIN_FONT, MAX_FONT = 10, 26


def draw_overlay(
    image: Image.Image, gt: Boxes, coarse: Boxes, refined: Boxes, snapped: Boxes | None = None
) -> Image.Image:
    """A copy of `image` as RGB, same size, with the boxes and a legend strip at the top.

    gt, coarse, refined (and snapped): xyxy pixel boxes (N x 4 each; the counts may differ). Ground truth is
    drawn twice as wide and first, the dashed coarse boxes next, the snapped ones thin, the refined boxes
    last, so a refined box lying on its ground-truth box shows as a cyan line inside a green frame. Lines
    are centred on the box edges.
    """
    canvas = image.convert("RGB")  # always a copy, whatever the mode
    width = max(1, round(min(canvas.size) * LINE_PER_PIXEL))
    draw = ImageDraw.Draw(canvas)
    for box in _rows(gt):
        solid_box(draw, box, GT_COLOUR, 2 * width)
    for box in _rows(coarse):
        dashed_box(draw, box, COARSE_COLOUR, width, dash=4 * width + 4)
    legend = LEGEND
    if snapped is not None:
        for box in _rows(snapped):
            solid_box(draw, box, SNAP_COLOUR, max(1, width // 2))
        legend = (*LEGEND, ("snap", SNAP_COLOUR))
    for box in _rows(refined):
        solid_box(draw, box, REFINED_COLOUR, width)
    return _with_legend(canvas, legend)


def save_overlays(
    out_dir: Path, items: Iterable[tuple[str, Image.Image, Boxes, Boxes, Boxes, Boxes | None]], limit: int = 8
) -> list[Path]:
    """Write `overlay_<name>.png` for the first `limit` of (name, image, gt, coarse, refined, snapped or None);
    return the paths.

    `items` is read lazily, so only the images written are ever loaded. Characters other than letters,
    digits, '.', '_' and '-' in a name (a '/' from a nested file name) become '_'.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, image, gt, coarse, refined, snapped in itertools.islice(items, max(0, limit)):
        path = out_dir / f"overlay_{re.sub(r'[^A-Za-z0-9._-]', '_', name)}.png"
        draw_overlay(image, gt, coarse, refined, snapped).save(path)
        written.append(path)
    return written


def _rows(boxes: Boxes) -> list[tuple[float, float, float, float]]:
    """Boxes as (left, top, right, bottom) Python floats: PIL takes no tensors and no inverted corners."""
    rows = []
    for x1, y1, x2, y2 in boxes:
        x1, y1, x2, y2 = float(x1), float(y1), float(x2), float(y2)
        rows.append((min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)))
    return rows


def solid_box(draw: ImageDraw.ImageDraw, box: tuple[float, ...], colour: tuple[int, int, int], width: int) -> None:
    """A rectangle whose lines are centred on the box edges (PIL draws `width` inward from the outline)."""
    x1, y1, x2, y2 = box
    half = width // 2
    draw.rectangle((x1 - half, y1 - half, x2 + half, y2 + half), outline=colour, width=width)


def dashed_box(
    draw: ImageDraw.ImageDraw, box: tuple[float, ...], colour: tuple[int, int, int], width: int, dash: int
) -> None:
    """A rectangle of dashes `dash` pixels long with gaps as long, walking each edge from its first corner."""
    x1, y1, x2, y2 = box
    for (ax, ay), (bx, by) in (((x1, y1), (x2, y1)), ((x2, y1), (x2, y2)), ((x2, y2), (x1, y2)), ((x1, y2), (x1, y1))):
        length = max(abs(bx - ax), abs(by - ay))  # edges are axis-aligned
        ux, uy = ((bx - ax) / length, (by - ay) / length) if length else (0.0, 0.0)
        for start in range(0, max(1, math.ceil(length)), 2 * dash):
            end = min(start + dash, length)
            draw.line((ax + ux * start, ay + uy * start, ax + ux * end, ay + uy * end), fill=colour, width=width)


def _with_legend(canvas: Image.Image, legend: Sequence[tuple[str, tuple[int, int, int]]]) -> Image.Image:
    """`canvas` with a dark semi-opaque strip across the top holding a swatch and a label per box kind.

    Entries that do not fit the image width wrap onto another line of the strip (narrow images).
    """
    size = min(MAX_FONT, max(MIN_FONT, round(min(canvas.size) * FONT_PER_PIXEL)))
    font = ImageFont.load_default(size=size)
    pad = max(2, size // 3)
    positions = _legend_layout(ImageDraw.Draw(canvas), font, size, pad, canvas.width, legend)
    strip = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    bottom = max(y for _, _, y in positions) + size + pad
    ImageDraw.Draw(strip).rectangle((0, 0, canvas.width, bottom), fill=LEGEND_BACKGROUND)
    canvas = Image.alpha_composite(canvas.convert("RGBA"), strip).convert("RGB")
    draw = ImageDraw.Draw(canvas)
    for (label, colour), (swatch_x, text_x, y) in zip(legend, positions, strict=True):
        draw.rectangle((swatch_x, y, swatch_x + size - 1, y + size - 1), fill=colour)
        draw.text((text_x, y), label, fill=colour, font=font)
    return canvas


def _legend_layout(
    draw: ImageDraw.ImageDraw,
    font: Font,
    size: int,
    pad: int,
    width: int,
    legend: Sequence[tuple[str, tuple[int, int, int]]],
) -> list[tuple[int, int, int]]:
    """Per legend entry (swatch x, label x, top y) for a `font` of `size` px, wrapped at `width` px."""
    positions = []
    x, y = pad, pad
    for label, _ in legend:
        entry = size + pad + round(draw.textlength(label, font=font))
        if x > pad and x + entry > width:
            x, y = pad, y + size + pad
        positions.append((x, x + size + pad, y))
        x += entry + 2 * pad
    return positions
