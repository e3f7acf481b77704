"""Shared fixtures: a handful of small real images, their COCO file, and one store extracted once."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from pipeline.extract import ExtractConfig, run_extract
from stages.cli import app


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


@pytest.fixture(scope="session")
def base_dataset(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Four images, their COCO file and a store with their vit_tiny (random-init) features, built once."""
    root = tmp_path_factory.mktemp("base")
    files = write_images(root / "images", 4)
    annotations = write_coco(root / "train.json", root / "images", files)
    store = root / "features.zarr"
    summary = run_extract(ExtractConfig(images=root / "images", store=str(store), annotations=annotations, workers=0))
    assert summary.computed == 4
    return {"root": root, "images": root / "images", "annotations": annotations, "store": store, "files": files}


@pytest.fixture
def dataset(base_dataset: dict, tmp_path: Path) -> dict:
    """A private copy of the base dataset and its store, free to change."""
    shutil.copytree(base_dataset["images"], tmp_path / "images")
    shutil.copytree(base_dataset["store"], tmp_path / "features.zarr")
    annotations = tmp_path / "train.json"
    shutil.copy(base_dataset["annotations"], annotations)
    return {
        "root": tmp_path,
        "images": tmp_path / "images",
        "annotations": annotations,
        "store": tmp_path / "features.zarr",
        "files": sorted((tmp_path / "images").iterdir()),
    }


@pytest.fixture
def cli():
    """Run the real `refine` CLI in-process; returns the click Result (exit_code, stdout, stderr)."""
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, [str(a) for a in args])

    return invoke
