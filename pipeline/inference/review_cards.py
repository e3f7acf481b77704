"""A review card: one box to review (`ReviewCard`), and its crop: the boxes with some context, drawn as the
overlays draw them, one JPEG per card (`write_crops`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from pipeline.coco import check_relative_path
from pipeline.images import load_rgb, read_file
from pipeline.inference.overlays import COARSE_COLOUR, GT_COLOUR, REFINED_COLOUR, dashed_box, solid_box

Box = tuple[float, float, float, float]

PROPOSED_COLOUR = (255, 0, 255)  # magenta, thin: what the refiner proposed when the coarse box was kept
CROP_SIZE = 240  # px, the longer side of every crop (small boxes are enlarged, so a pixel's move shows)
MARGIN = 0.25  # context around the boxes, as a share of their union's longer side ...
MIN_MARGIN = 8  # ... and at least this many image pixels
JPEG_QUALITY = 85


@dataclass(frozen=True)
class ReviewCard:
    """One box to review. Boxes are xyxy in original image pixels; strings and ids come from input files."""

    image_file: str  # relative to the image root
    image_id: int | str
    box_id: int | str | None  # the annotation id, or the detection's index in a results list
    category: str  # the category name, or str of its id when it has none
    coarse: Box
    refined: Box  # the box refine recommends: the coarse box when it was kept
    proposed: Box  # what the refiner proposed: differs from `refined` when `kept_coarse`
    score: float  # in [0, 1]
    kept_coarse: bool
    truth: Box | None = None  # the ground-truth box, when annotations are given
    iou_coarse: float | None = None  # IoU with `truth`
    iou_refined: float | None = None


def write_crops(
    folder: Path, image_root: Path, cards: Sequence[ReviewCard], listed: set[int]
) -> dict[int, tuple[int, int]]:
    """Write `crops/NNNNNN.jpg` per listed card, reading each image once; return each crop's (width, height)."""
    by_image: dict[str, list[int]] = {}
    for index in sorted(listed):
        by_image.setdefault(cards[index].image_file, []).append(index)
    sizes = {}
    for file_name, indices in by_image.items():
        check_relative_path(file_name, f"review card {indices[0]} (image {cards[indices[0]].image_id!r})")
        path = image_root / file_name
        image = load_rgb(path, read_file(path))
        for index in indices:
            crop = draw_crop(image, cards[index])
            crop.save(folder / crop_name(index), quality=JPEG_QUALITY)
            sizes[index] = crop.size
        image.close()
    return sizes


def crop_name(index: int) -> str:
    return f"crops/{index:06d}.jpg"


def draw_crop(image: Image.Image, card: ReviewCard) -> Image.Image:
    """The card's boxes with some context, scaled to CROP_SIZE on the longer side, boxes drawn on it."""
    boxes = [card.coarse, card.refined, card.proposed] + ([card.truth] if card.truth is not None else [])
    x1, y1 = min(b[0] for b in boxes), min(b[1] for b in boxes)
    x2, y2 = max(b[2] for b in boxes), max(b[3] for b in boxes)
    margin = max(MIN_MARGIN, MARGIN * max(x2 - x1, y2 - y1))
    # Clipped to the image, at least one pixel even when every box lies outside it.
    left = min(max(0, math.floor(x1 - margin)), image.width - 1)
    top = min(max(0, math.floor(y1 - margin)), image.height - 1)
    right = max(min(image.width, math.ceil(x2 + margin)), left + 1)
    bottom = max(min(image.height, math.ceil(y2 + margin)), top + 1)
    scale = CROP_SIZE / max(right - left, bottom - top)
    size = (max(1, round((right - left) * scale)), max(1, round((bottom - top) * scale)))
    crop = image.crop((left, top, right, bottom)).resize(size, Image.Resampling.BILINEAR)

    def place(box: Box) -> Box:
        return ((box[0] - left) * scale, (box[1] - top) * scale, (box[2] - left) * scale, (box[3] - top) * scale)

    # As in the overlays: truth wide and first, coarse dashed, refined on top; the untaken proposal thin.
    draw = ImageDraw.Draw(crop)
    if card.truth is not None:
        solid_box(draw, place(card.truth), GT_COLOUR, 4)
    dashed_box(draw, place(card.coarse), COARSE_COLOUR, 2, dash=8)
    if card.kept_coarse:
        solid_box(draw, place(card.proposed), PROPOSED_COLOUR, 1)
    solid_box(draw, place(card.refined), REFINED_COLOUR, 2)
    return crop
