"""A second scene generator, written apart from `pipeline/demo_data.py`, to check that the refiner's defaults
are not tuned to the demo's look.

    python bench/other_scenes.py --out data/other [--n-train 288] [--n-val 48] [--seed 0]
    refine extract --images data/other/images --annotations data/other/train.json --store data/other.zarr
    refine extract --images data/other/images --annotations data/other/val.json --store data/other.zarr
    refine train --store data/other.zarr --annotations data/other/train.json \
        --val-annotations data/other/val.json --out data/other-refiner
    refine evaluate --store data/other.zarr --annotations data/other/val.json \
        --model data/other-refiner/model.pt --out data/other-eval

What differs from the demo: backgrounds of sinusoidal gratings under smooth colour noise (the demo: flat,
gradient, striped or noisy fills with clutter), organic blobs, crosses, stroke clusters and crescents (the
demo: ellipses, polygons, rounded rectangles, bars, rings, stars), objects shaded across their extent and
casting soft shadows that are not part of their box, 1-12 objects per scene, image sides 380-1000 px. As in
the demo, the ground truth is the tight box of each object's pixels still visible after later objects
cover it (objects left under 40% visible are dropped), and about one object in ten is centred on the
border.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CATEGORIES = ("blob", "cross", "strokes", "crescent")
SIDE_RANGE = (380, 1000)
MAX_OBJECTS = 12
MIN_SIZE = 20.0
MAX_SIZE_FRACTION = 0.55
BORDER_PROBABILITY = 0.1
MIN_VISIBLE_FRACTION = 0.4
MIN_VISIBLE_PIXELS = 30
SHADOW_STRENGTH = 0.35


def background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """H x W x 3 float: a base colour, 1-3 gratings and smooth colour noise."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    canvas = np.zeros((height, width, 3), np.float32)
    canvas += rng.uniform(40, 200, 3)
    for _ in range(rng.integers(1, 4)):
        frequency, angle = rng.uniform(0.005, 0.05), rng.uniform(0, math.pi)
        amplitude = rng.uniform(5, 35, 3)
        phase = (x * math.cos(angle) + y * math.sin(angle)) * frequency * 2 * math.pi + rng.uniform(0, 6)
        canvas += np.sin(phase)[..., None] * amplitude
    coarse = rng.normal(0, 25, (max(2, height // 24), max(2, width // 24), 3)).astype(np.float32)
    noise = Image.fromarray(np.clip(coarse + 128, 0, 255).astype(np.uint8)).resize((width, height), Image.BICUBIC)
    return canvas + (np.asarray(noise, np.float32) - 128)


def shape_mask(
    rng: np.random.Generator, category: str, size: float, height: int, width: int, centre: tuple
) -> np.ndarray:
    """H x W bool mask of one object of `category`, about `size` pixels across, at `centre` (x, y)."""
    mask = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(mask)
    cx, cy = centre
    if category == "blob":
        angles = np.linspace(0, 2 * math.pi, 64, endpoint=False)
        radius = np.ones(64)
        for k in range(2, 6):
            radius += rng.uniform(-0.25, 0.25) * np.cos(k * angles + rng.uniform(0, 6)) / k * 2
        squash = rng.uniform(0.5, 1.0)
        draw.polygon(
            [
                (cx + size / 2 * r * math.cos(a), cy + size / 2 * r * squash * math.sin(a))
                for r, a in zip(radius, angles, strict=True)
            ],
            fill=255,
        )
    elif category == "cross":
        first, thickness = rng.uniform(0, math.pi), max(3, int(size * rng.uniform(0.12, 0.3)))
        for angle in (first, first + math.pi / 2 * rng.uniform(0.7, 1.3)):
            dx, dy = math.cos(angle) * size / 2, math.sin(angle) * size / 2
            draw.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=255, width=thickness)
    elif category == "strokes":
        for _ in range(rng.integers(3, 7)):
            ends = [(cx + rng.uniform(-size / 2, size / 2), cy + rng.uniform(-size / 2, size / 2)) for _ in range(2)]
            draw.line(ends, fill=255, width=int(rng.integers(3, 8)))
    else:  # crescent: a disc with an offset disc cut out
        r, shift, angle = size / 2, size / 2 * rng.uniform(0.3, 0.7), rng.uniform(0, 2 * math.pi)
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        dx, dy = shift * math.cos(angle), shift * math.sin(angle)
        draw.ellipse([cx - r + dx, cy - r + dy, cx + r + dx, cy + r + dy], fill=0)
    return np.asarray(mask) > 127


def render_scene(seed: int, split: str, index: int) -> tuple[Image.Image, list[dict]]:
    """One image and its annotations (COCO, without ids), the same for the same (seed, split, index)."""
    rng = np.random.default_rng([seed, 0 if split == "train" else 1, index, 77])
    height, width = (int(rng.integers(*SIDE_RANGE)) for _ in range(2))
    canvas = background(rng, height, width)
    owner = np.full((height, width), -1, np.int32)
    objects: list[tuple[int, int]] = []  # category index, full pixel count
    for _ in range(int(rng.integers(1, MAX_OBJECTS + 1))):
        category = int(rng.integers(len(CATEGORIES)))
        size = float(np.exp(rng.uniform(math.log(MIN_SIZE), math.log(MAX_SIZE_FRACTION * min(height, width)))))
        if rng.random() < BORDER_PROBABILITY:
            along = rng.random() < 0.5
            centre = (
                (rng.choice([0, width]), rng.uniform(0, height))
                if along
                else (rng.uniform(0, width), rng.choice([0, height]))
            )
        else:
            centre = (rng.uniform(size / 2, width - size / 2), rng.uniform(size / 2, height - size / 2))
        mask = shape_mask(rng, CATEGORIES[category], size, height, width, centre)
        if mask.sum() < MIN_VISIBLE_PIXELS:
            continue
        # A soft shadow, down and to the right; it darkens what lies below and is no part of the object.
        blurred = Image.fromarray((mask * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(size * 0.04))
        offset = int(size * 0.05)
        shadow = np.roll(np.asarray(blurred, np.float32) / 255, (offset, offset), axis=(0, 1))
        canvas *= 1 - SHADOW_STRENGTH * shadow[..., None]
        ys, xs = np.nonzero(mask)
        colour = rng.uniform(0, 255, 3)
        across = (np.arange(width)[None, :] - xs.mean()) / size + (np.arange(height)[:, None] - ys.mean()) / size
        painted = colour[None, None, :] * (1 + 0.25 * across)[..., None] * rng.uniform(0.8, 1.1)
        canvas[mask] = painted[mask]
        owner[mask] = len(objects)
        objects.append((category, int(mask.sum())))
    pixels = np.clip(canvas + rng.normal(0, 4, canvas.shape), 0, 255).astype(np.uint8)
    annotations = []
    for number, (category, full) in enumerate(objects):
        visible = owner == number
        if visible.sum() < max(MIN_VISIBLE_PIXELS, MIN_VISIBLE_FRACTION * full):
            continue
        ys, xs = np.nonzero(visible)
        x0, y0 = float(xs.min()), float(ys.min())
        box = [x0, y0, float(xs.max() + 1) - x0, float(ys.max() + 1) - y0]
        annotations.append({"category_id": category + 1, "bbox": box, "area": float(visible.sum()), "iscrowd": 0})
    return Image.fromarray(pixels), annotations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for images/, train.json and val.json")
    parser.add_argument("--n-train", type=int, default=288, help="training images")
    parser.add_argument("--n-val", type=int, default=48, help="validation images")
    parser.add_argument("--seed", type=int, default=0, help="seed of every scene")
    args = parser.parse_args()
    (args.out / "images").mkdir(parents=True, exist_ok=True)
    for split, count in (("train", args.n_train), ("val", args.n_val)):
        images, annotations = [], []
        for index in range(count):
            picture, objects = render_scene(args.seed, split, index)
            name = f"{split}_{index:04d}.jpg"
            picture.save(args.out / "images" / name, quality=92)
            images.append({"id": index + 1, "file_name": name, "width": picture.width, "height": picture.height})
            for annotation in objects:
                annotations.append({"id": len(annotations) + 1, "image_id": index + 1, **annotation})
        categories = [{"id": k + 1, "name": name} for k, name in enumerate(CATEGORIES)]
        coco = {"images": images, "annotations": annotations, "categories": categories}
        (args.out / f"{split}.json").write_text(json.dumps(coco))
        print(f"{split}: {len(images)} images, {len(annotations)} boxes")


if __name__ == "__main__":
    main()
