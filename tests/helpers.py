"""Helpers the tests share: small real images and their COCO file, the one-line error check, and what
the store tests look for on disk (committed rows, orphans) and write into it (synthetic segments)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.store import Namespace
from pipeline.store.writer import SegmentWriter

EARLY_CHANNELS = 160  # vit_tiny's early channels: the gc tests write synthetic features, no encoder


def write_images(folder: Path, count: int, seed: int = 0, prefix: str = "img") -> list[Path]:
    """Small images of varied size, each with its own content (so each has its own key)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        height, width = int(rng.integers(40, 120)), int(rng.integers(40, 120))
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        path = folder / f"{prefix}{i}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def write_coco(path: Path, image_root: Path, files: list[Path], boxes_per_image: int = 1) -> Path:
    """A COCO file listing `files` (relative to `image_root`) with one centred box each."""
    images, annotations = [], []
    for i, file in enumerate(files, start=1):
        with Image.open(file) as opened:
            width, height = opened.size
        images.append({"id": i, "file_name": file.relative_to(image_root).as_posix(), "width": width, "height": height})
        for j in range(boxes_per_image):
            annotations.append(
                {
                    "id": i * 100 + j,
                    "image_id": i,
                    "category_id": 1,
                    "bbox": [width / 4, height / 4, width / 2, height / 2],
                }
            )
    path.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "thing"}]})
    )
    return path


def assert_clean_error(result, *fragments: str) -> None:
    assert result.exit_code == 1, result.output
    message = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(message) == 1, result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def files_under(path: Path) -> set[str]:
    return {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}


def rows_by_key(store: Path) -> dict[str, int]:
    """How many committed rows each key has, over every commit file."""
    counts: dict[str, int] = {}
    for commit in store.glob("*/commits/*.json"):
        for row in json.loads(commit.read_text())["entries"]:
            counts[row[0]] = counts.get(row[0], 0) + 1
    return counts


def orphans(store: Path) -> list[str]:
    """Files no commit references: segments without a commit, shards without a committed row, temporaries."""
    found = [p.name for p in store.rglob("*.partial")]
    for segment in (p for p in store.glob("*/segments/*") if p.is_dir()):
        commit = segment.parents[1] / "commits" / f"{segment.name}.json"
        if not commit.exists():
            found.append(segment.name)
            continue
        data = json.loads(commit.read_text())
        used = {row[1] // data["shard_rows"] for row in data["entries"]}
        found += [shard.as_posix() for shard in segment.glob("*/c/*") if int(shard.name) not in used]
    return found


def features(seed: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (
        rng.standard_normal((rows, 256, 64, 64)).astype(np.float16),
        rng.standard_normal((rows, EARLY_CHANNELS, 64, 64)).astype(np.float16),
    )


def write(namespace: Namespace, keys: list[str], seed: int, shard_rows: int = 2):
    """A fresh writer (own segment) committing `keys` in one batch; returns the writer."""
    writer = SegmentWriter(namespace, EARLY_CHANNELS, shard_rows, planes=False)
    embedding, early = features(seed, len(keys))
    writer.write_batch(keys, embedding, early, [(64, 64)] * len(keys), [(1024, 1024)] * len(keys))
    return writer


def extract_args(images: Path, annotations: Path, store: Path) -> list:
    """`refine extract`'s arguments for one image a batch and no loader workers: a kill lands between batches."""
    return ["extract", "--images", images, "--annotations", annotations, "--store", store, "--batch-size", "1",
            "--workers", "0"]  # fmt: skip
