"""The synthetic demo dataset: cluttered JPEG scenes with exact COCO boxes, byte-identical for a given seed.

Every object is rasterised as a binary mask and composited in painting order, so the ground truth is the
tight box of the pixels that stay visible after later objects occlude it: no annotator noise to learn.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import re
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from pipeline.errors import RefineError

CATEGORIES = ("ellipse", "polygon", "rounded_rectangle", "bar", "ring", "star")
SPLITS = ("train", "val")
JPEG_QUALITY = 92
SIDE_RANGE = (300, 900)  # width and height are drawn independently, so aspect ratios vary too
MAX_OBJECTS = (
    16  # objects per scene are drawn from 1..MAX_OBJECTS: the encoder costs per image, training learns per box
)
MIN_SIZE = 15.0  # smallest object extent in pixels
MAX_SIZE_FRACTION = 0.6  # largest object extent, as a fraction of the shorter image side
BAR_WIDTH_RANGE = (4.0, 12.0)
# An object that later objects hide this much is no longer a fair detection target.
MIN_VISIBLE_FRACTION = 0.4
MIN_VISIBLE_PIXELS = 30
ATTEMPTS_PER_OBJECT = 4
# How often a new object is placed onto an existing one, so that scenes have occlusions.
OVERLAP_PROBABILITY = 0.35
# How often an object is centred on the image border, so that the border cuts it (as in real photos).
BORDER_PROBABILITY = 0.1
COLOUR_CANDIDATES = 16
# Objects this close (in pixels) get distinct colours too, so a shared edge is never ambiguous.
TOUCH_DISTANCE = 3
TEXTURES = ("flat", "gradient", "stripes", "noise")
# Splits this large are rendered by a process pool (one worker per this many images, up to one per core).
IMAGES_PER_WORKER = 32
_IMAGE_NAME = re.compile(r"(train|val)_\d{4,}\.jpg")


@dataclass(frozen=True)
class SceneObject:
    """One annotated object: its category and the mask of its pixels left visible in the final image."""

    category_id: int
    mask: np.ndarray  # bool, H x W

    @property
    def area(self) -> int:
        return int(self.mask.sum())

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        """Tight COCO box [x, y, w, h] around the visible pixels, in whole pixels."""
        rows = np.flatnonzero(self.mask.any(axis=1))
        cols = np.flatnonzero(self.mask.any(axis=0))
        x, y = int(cols[0]), int(rows[0])
        return float(x), float(y), float(cols[-1] - x + 1), float(rows[-1] - y + 1)


@dataclass(frozen=True)
class Scene:
    """A rendered image (uint8, H x W x 3, before JPEG) and its objects in painting order."""

    image: np.ndarray
    objects: list[SceneObject]


@dataclass
class _Placed:
    """An object while its scene is built: its own pixel count and the part later objects leave visible."""

    category_id: int
    own_area: int
    visible: np.ndarray
    colour: np.ndarray


def image_name(split: str, index: int) -> str:
    """File name of a demo image, relative to the images folder."""
    return f"{split}_{index:04d}.jpg"


def render_scene(seed: int, split: str, index: int, max_objects: int = MAX_OBJECTS) -> Scene:
    """Draw one scene; it depends only on (seed, split, index, max_objects), so growing one split leaves the
    rest alone."""
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    height, width = (int(v) for v in rng.integers(SIDE_RANGE[0], SIDE_RANGE[1] + 1, size=2))
    canvas = _background(rng, height, width)
    _add_clutter(rng, canvas)
    placed: list[_Placed] = []
    target = int(rng.integers(1, max_objects + 1))
    attempts = 0
    # Keep trying past the budget while the scene is empty: every image has at least one object.
    while len(placed) < target and (attempts < ATTEMPTS_PER_OBJECT * target or not placed):
        attempts += 1
        _try_place(rng, canvas, placed)
    image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    return Scene(image, [SceneObject(p.category_id, p.visible) for p in placed])


def make_demo_dataset(
    out_dir: Path, seed: int = 0, n_train: int = 288, n_val: int = 48, max_objects: int = MAX_OBJECTS
) -> dict[str, dict[str, int]]:
    """Write out_dir/images/*.jpg, train.json and val.json; return image and box counts per split."""
    if seed < 0:
        raise RefineError(f"seed must be a non-negative integer, got {seed}")
    if max_objects < 1:
        raise RefineError(f"max_objects must be at least 1, got {max_objects}")
    counts = {"train": n_train, "val": n_val}
    for split, count in counts.items():
        if count < 1:
            raise RefineError(f"n_{split} must be at least 1, got {count}")
    images_dir = out_dir / "images"
    summary: dict[str, dict[str, int]] = {}
    next_image_id, next_annotation_id = 1, 1
    try:
        images_dir.mkdir(parents=True, exist_ok=True)
        datasets: dict[str, dict[str, Any]] = {}
        for split, count in counts.items():
            datasets[split] = _write_split(
                images_dir, seed, split, count, max_objects, next_image_id, next_annotation_id
            )
            next_image_id += count
            next_annotation_id += len(datasets[split]["annotations"])
            summary[split] = {"images": count, "annotations": len(datasets[split]["annotations"])}
        _remove_stale_images(images_dir, {image_name(split, i) for split, n in counts.items() for i in range(n)})
        # The JSON files go last: they only ever name images that are already on disk.
        for split, dataset in datasets.items():
            (out_dir / f"{split}.json").write_text(
                json.dumps(dataset, indent=1, sort_keys=True) + "\n", encoding="utf-8"
            )
    except OSError as error:
        where = error.filename or out_dir
        raise RefineError(f"{where}: cannot write the demo dataset ({error.strerror or error})") from None
    return summary


def _write_split(
    images_dir: Path,
    seed: int,
    split: str,
    count: int,
    max_objects: int,
    first_image_id: int,
    first_annotation_id: int,
) -> dict[str, Any]:
    """Render and save one split's images (in parallel for large splits); return its COCO dataset."""
    jobs = [(images_dir, seed, split, index, max_objects) for index in range(count)]
    workers = min(os.cpu_count() or 1, count // IMAGES_PER_WORKER)
    if workers > 1:
        # forkserver: the caller may hold zarr's or torch's threads, which a plain fork would copy mid-lock.
        context = multiprocessing.get_context("forkserver")
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            rendered = list(pool.map(_render_and_save, jobs, chunksize=8))
    else:
        rendered = [_render_and_save(job) for job in jobs]
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for index, (height, width, objects) in enumerate(rendered):
        image_id = first_image_id + index
        images.append({"id": image_id, "file_name": image_name(split, index), "width": width, "height": height})
        for category_id, bbox, area in objects:
            annotations.append(
                {
                    "id": first_annotation_id + len(annotations),
                    "image_id": image_id,
                    "category_id": category_id,
                    "bbox": bbox,
                    "area": area,
                    "iscrowd": 0,
                }
            )
    categories = [{"id": i + 1, "name": category} for i, category in enumerate(CATEGORIES)]
    return {"images": images, "annotations": annotations, "categories": categories}


def _render_and_save(
    job: tuple[Path, int, str, int, int],
) -> tuple[int, int, list[tuple[int, list[float], int]]]:
    """Render one scene and save its JPEG; return its height, width and (category, bbox, area) per object."""
    images_dir, seed, split, index, max_objects = job
    scene = render_scene(seed, split, index, max_objects)
    # No EXIF, no timestamps: Pillow's JPEG writer is then a pure function of the pixels.
    Image.fromarray(scene.image).save(images_dir / image_name(split, index), format="JPEG", quality=JPEG_QUALITY)
    height, width = scene.image.shape[:2]
    return height, width, [(obj.category_id, list(obj.bbox), obj.area) for obj in scene.objects]


def _remove_stale_images(images_dir: Path, keep: set[str]) -> None:
    """Delete demo images left by an earlier, larger run; leave every other file alone."""
    for path in sorted(images_dir.iterdir()):
        if _IMAGE_NAME.fullmatch(path.name) and path.name not in keep:
            path.unlink()


# --- background ---------------------------------------------------------------------------------------


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Smooth low-frequency colour noise, a finer octave on top, and sensor-like grain (float, H x W x 3)."""
    base = rng.uniform(40.0, 215.0, size=3).astype(np.float32)
    coarse = _smooth_noise(rng, height, width, cells=int(rng.integers(2, 6))) * np.float32(rng.uniform(20.0, 60.0))
    fine = _smooth_noise(rng, height, width, cells=int(rng.integers(8, 24))) * np.float32(rng.uniform(4.0, 18.0))
    grain = rng.standard_normal((height, width, 3), dtype=np.float32) * np.float32(rng.uniform(2.0, 6.0))
    return base + coarse + fine + grain


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """Colour noise in [-1, 1] that varies over about `cells` periods along the longer side."""
    scale = cells / max(height, width)
    grid_h, grid_w = max(2, round(height * scale)), max(2, round(width * scale))
    grid = rng.integers(0, 256, size=(grid_h, grid_w, 3), dtype=np.uint8)
    # Bicubic alone leaves a visible grid of cell seams; a blur of a third of a cell hides it. Blurring at a
    # quarter of the resolution is 16x cheaper and the final bilinear step adds no seams of its own.
    small = (max(1, width // 4), max(1, height // 4))
    smooth = Image.fromarray(grid).resize(small, Image.Resampling.BICUBIC)
    smooth = smooth.filter(ImageFilter.GaussianBlur(radius=1 / (12 * scale)))
    smooth = smooth.resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(smooth, dtype=np.float32) / 127.5 - 1.0


def _add_clutter(rng: np.random.Generator, canvas: np.ndarray) -> None:
    """Unannotated strokes and blobs, mostly low-contrast, that a box refiner must learn to ignore."""
    height, width = canvas.shape[:2]
    picture = Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    count = int(rng.integers(5, 15 + height * width // 10_000))
    for _ in range(count):
        x, y = rng.uniform(0, width), rng.uniform(0, height)
        local = canvas[int(y), int(x)]
        if rng.random() < 0.2:
            colour = rng.uniform(0, 255, size=3)
        else:
            colour = local + rng.choice([-1.0, 1.0], size=3) * rng.uniform(8.0, 35.0, size=3)
        fill = tuple(int(v) for v in np.clip(colour, 0, 255))
        if rng.random() < 0.6:
            steps = rng.normal(0.0, 15.0, size=(int(rng.integers(1, 5)), 2))
            points = np.vstack([[x, y], [x, y] + np.cumsum(steps, axis=0)])
            draw.line([tuple(p) for p in points.tolist()], fill=fill, width=int(rng.integers(1, 4)))
        else:
            rx, ry = rng.uniform(1.5, 6.0, size=2)
            draw.ellipse([x - rx, y - ry, x + rx, y + ry], fill=fill)
    canvas[...] = np.asarray(picture, dtype=np.float32)


# --- objects ------------------------------------------------------------------------------------------


def _try_place(rng: np.random.Generator, canvas: np.ndarray, placed: list[_Placed]) -> None:
    """Draw one random object on top, unless it is too small or hides too much of an earlier object."""
    height, width = canvas.shape[:2]
    category = int(rng.integers(len(CATEGORIES)))
    outline, holes = _SHAPES[CATEGORIES[category]](rng, _object_size(rng, height, width), height, width)
    if rng.random() < BORDER_PROBABILITY:
        offset = _on_border(rng, height, width)
    else:
        offset = _offset(outline, _centre(rng, placed, height, width), height, width)
    mask = _rasterise(outline + offset, [h + offset for h in holes], height, width)
    own_area = int(mask.sum())
    if own_area < MIN_VISIBLE_PIXELS:
        return
    still_visible = [p.visible & ~mask for p in placed]
    for p, visible in zip(placed, still_visible, strict=True):
        area = int(visible.sum())
        if area < MIN_VISIBLE_PIXELS or area < MIN_VISIBLE_FRACTION * p.own_area:
            return
    # Reference colours: the background under the new object and every object it overlaps or touches.
    window = _window(mask, margin=TOUCH_DISTANCE)
    near = _grow(mask[window], TOUCH_DISTANCE)
    references = [canvas[mask].mean(axis=0)] + [p.colour for p in placed if (p.visible[window] & near).any()]
    colour = _distinct_colour(rng, references)
    _paint(rng, canvas, mask, colour, float(min(np.linalg.norm(colour - r) for r in references)))
    for p, visible in zip(placed, still_visible, strict=True):
        p.visible = visible
    placed.append(_Placed(category + 1, own_area, mask, colour))


def _object_size(rng: np.random.Generator, height: int, width: int) -> float:
    """Extent between MIN_SIZE and MAX_SIZE_FRACTION of the image, on a log scale tilted towards large.

    Plain log-uniform sizes left most scenes nearly empty; a power(1.5) draw puts the median extent near
    100 px in a 600 px image.
    """
    largest = MAX_SIZE_FRACTION * min(height, width)
    return float(MIN_SIZE * (largest / MIN_SIZE) ** rng.power(1.5))


def _centre(rng: np.random.Generator, placed: list[_Placed], height: int, width: int) -> np.ndarray:
    """Anywhere in the image, or on a visible pixel of an earlier object to provoke an occlusion."""
    if placed and rng.random() < OVERLAP_PROBABILITY:
        target = placed[int(rng.integers(len(placed)))].visible
        rows, cols = np.nonzero(target)
        pick = int(rng.integers(len(rows)))
        return np.array([cols[pick], rows[pick]], dtype=np.float64)
    return rng.uniform([0.0, 0.0], [width - 1.0, height - 1.0])


def _offset(outline: np.ndarray, centre: np.ndarray, height: int, width: int) -> np.ndarray:
    """Move the origin-centred shape to `centre`, shifted as needed to keep it wholly inside the image."""
    low = -outline.min(axis=0)
    high = np.array([width - 1.0, height - 1.0]) - outline.max(axis=0)
    # Shapes are sized to fit, but guard anyway: a shape wider than the image is centred.
    return np.where(low <= high, np.clip(centre, low, high), (low + high) / 2)


def _on_border(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A centre on a random point of the image's border: the border cuts the shape about in half."""
    along = rng.uniform(0.0, 1.0)
    side = int(rng.integers(4))
    if side < 2:  # left or right edge
        return np.array([side * (width - 1.0), along * (height - 1.0)])
    return np.array([along * (width - 1.0), (side - 2) * (height - 1.0)])


def _rotate(points: np.ndarray, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return points @ np.array([[c, s], [-s, c]])


def _ellipse_points(a: float, b: float, n: int = 128) -> np.ndarray:
    # 128 vertices keep the polygon within a fifth of a pixel of a true ellipse of radius 450.
    t = np.linspace(0.0, 2.0 * math.pi, n, endpoint=False)
    return np.stack([a * np.cos(t), b * np.sin(t)], axis=1)


def _ellipse(rng: np.random.Generator, size: float, height: int, width: int) -> tuple[np.ndarray, list[np.ndarray]]:
    a = size / 2
    return _rotate(_ellipse_points(a, a * rng.uniform(0.35, 1.0)), rng.uniform(0, math.pi)), []


def _polygon(rng: np.random.Generator, size: float, height: int, width: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """A polygon of 3 to 8 vertices at random angles and radii around its centre, often not convex."""
    k = int(rng.integers(3, 9))
    gaps = rng.uniform(0.5, 1.5, size=k)
    angles = np.cumsum(gaps) / gaps.sum() * 2 * math.pi
    radii = size / 2 * rng.uniform(0.55, 1.0, size=k)
    points = np.stack([radii * np.cos(angles), radii * np.sin(angles) * rng.uniform(0.5, 1.0)], axis=1)
    return _rotate(points, rng.uniform(0, 2 * math.pi)), []


def _rounded_rectangle(
    rng: np.random.Generator, size: float, height: int, width: int
) -> tuple[np.ndarray, list[np.ndarray]]:
    # The long side is size / sqrt(2) so the rotated diagonal still fits the size budget.
    half_w = size / 2 / math.sqrt(2)
    half_h = half_w * rng.uniform(0.3, 1.0)
    radius = min(half_w, half_h) * rng.uniform(0.15, 0.9)
    arc = np.linspace(0.0, math.pi / 2, 12)
    corners = []
    for sx, sy, start in ((1, 1, 0.0), (-1, 1, 0.5), (-1, -1, 1.0), (1, -1, 1.5)):
        t = arc + start * math.pi
        centre = np.array([sx * (half_w - radius), sy * (half_h - radius)])
        corners.append(centre + radius * np.stack([np.cos(t), np.sin(t)], axis=1))
    return _rotate(np.vstack(corners), rng.uniform(0, math.pi)), []


def _bar(rng: np.random.Generator, size: float, height: int, width: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """A thin, long rectangle at any angle: the hard case for boxes, mostly border."""
    bar_width = rng.uniform(*BAR_WIDTH_RANGE)
    longest = 0.85 * min(height, width) - BAR_WIDTH_RANGE[1]
    length = math.exp(rng.uniform(math.log(30.0), math.log(longest)))
    half = np.array([length / 2, bar_width / 2])
    points = half * np.array([[1, 1], [-1, 1], [-1, -1], [1, -1]])
    return _rotate(points, rng.uniform(0, math.pi)), []


def _ring(rng: np.random.Generator, size: float, height: int, width: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """An elliptical annulus; what lies behind it shows through the hole."""
    a = max(size, 24.0) / 2
    b = a * rng.uniform(0.6, 1.0)
    inner = rng.uniform(0.4, min(0.85, 1.0 - 4.0 / b))  # at least 4 px of ring everywhere
    angle = rng.uniform(0, math.pi)
    return _rotate(_ellipse_points(a, b), angle), [_rotate(_ellipse_points(a * inner, b * inner), angle)]


def _star(rng: np.random.Generator, size: float, height: int, width: int) -> tuple[np.ndarray, list[np.ndarray]]:
    k = int(rng.integers(5, 9))
    radii = np.tile([size / 2, size / 2 * rng.uniform(0.35, 0.6)], k)
    angles = np.arange(2 * k) * math.pi / k
    points = np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    return _rotate(points, rng.uniform(0, 2 * math.pi)), []


# (rng, size, image height, image width) -> origin-centred outline and holes, as N x 2 (x, y) vertex arrays.
ShapeMaker = Callable[[np.random.Generator, float, int, int], tuple[np.ndarray, list[np.ndarray]]]
_SHAPES: dict[str, ShapeMaker] = {
    "ellipse": _ellipse,
    "polygon": _polygon,
    "rounded_rectangle": _rounded_rectangle,
    "bar": _bar,
    "ring": _ring,
    "star": _star,
}


def _rasterise(outline: np.ndarray, holes: list[np.ndarray], height: int, width: int) -> np.ndarray:
    """Binary (not anti-aliased) mask, so every pixel is either the object's or not."""
    picture = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(picture)
    for points, fill in [(outline, 255)] + [(hole, 0) for hole in holes]:
        draw.polygon([tuple(p) for p in points.tolist()], fill=fill)
    return np.asarray(picture) > 0


def _window(mask: np.ndarray, margin: int = 0) -> tuple[slice, slice]:
    """The mask's bounding rectangle grown by `margin` pixels, clipped to the image, as array slices."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return (
        slice(max(0, rows[0] - margin), rows[-1] + 1 + margin),
        slice(max(0, cols[0] - margin), cols[-1] + 1 + margin),
    )


def _grow(mask: np.ndarray, steps: int) -> np.ndarray:
    """Dilate by `steps` pixels with a 3 x 3 square, vectorised as shifted ORs."""
    for _ in range(steps):
        padded = np.pad(mask, 1)
        height, width = mask.shape
        mask = np.logical_or.reduce([padded[dy : dy + height, dx : dx + width] for dy in range(3) for dx in range(3)])
    return mask


# --- colour and texture -------------------------------------------------------------------------------


def _distinct_colour(rng: np.random.Generator, references: list[np.ndarray]) -> np.ndarray:
    """The random colour farthest from all references, so JPEG cannot blur the object into its surround."""
    candidates = rng.uniform(0.0, 255.0, size=(COLOUR_CANDIDATES, 3))
    distance = np.min([np.linalg.norm(candidates - r, axis=1) for r in references], axis=0)
    return candidates[int(np.argmax(distance))]


def _paint(rng: np.random.Generator, canvas: np.ndarray, mask: np.ndarray, colour: np.ndarray, contrast: float) -> None:
    """Fill the mask with a flat, gradient, striped or noisy texture around `colour`."""
    window = _window(mask)
    ys, xs = np.mgrid[window].astype(np.float32)
    # Texture swings stay well under the contrast, so the darkest stripe still stands out.
    amplitude = min(45.0, 0.3 * contrast)
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    angle = rng.uniform(0, math.pi)
    along = xs * math.cos(angle) + ys * math.sin(angle)
    texture = TEXTURES[int(rng.integers(len(TEXTURES)))]
    if texture == "flat":
        shade = np.zeros_like(along)
    elif texture == "gradient":
        shade = 2 * (along - along.min()) / max(float(np.ptp(along)), 1.0) - 1
    elif texture == "stripes":
        shade = np.where((along / rng.uniform(6.0, 24.0)) % 1.0 < 0.5, -1.0, 1.0).astype(np.float32)
    else:
        shade = rng.uniform(-1.0, 1.0, size=along.shape).astype(np.float32)
    fill = np.clip(colour + amplitude * shade[..., None] * direction, 0, 255).astype(np.float32)
    local = mask[window]
    canvas[window][local] = fill[local]
