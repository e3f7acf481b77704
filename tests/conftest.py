"""Shared fixtures: a handful of small real images, their COCO file, one store extracted once, and one refiner
trained on it once."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.extraction.config import ExtractConfig
from pipeline.extraction.extract import run_extract
from stages.cli import app
from tests.helpers import write_coco, write_images


@pytest.fixture(scope="session")
def base_dataset(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Four images, their COCO file and a store with their vit_tiny (random-init) features, built once."""
    root = tmp_path_factory.mktemp("base")
    files = write_images(root / "images", 4)
    annotations = write_coco(root / "train.json", root / "images", files)
    store = root / "features.zarr"
    # fp32 features (`--amp off`): tests compare them with the package's own fp32 runs. extract's default
    # precision (bf16 where the CPU has it) is tested in tests/test_extract_cache.py.
    config = ExtractConfig(images=root / "images", store=str(store), annotations=annotations, workers=0, amp="off")
    summary = run_extract(config)
    assert summary.computed == 4
    return {"root": root, "images": root / "images", "annotations": annotations, "store": store, "files": files}


@pytest.fixture(scope="session")
def trained(base_dataset: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A refiner trained for one epoch on the base dataset (its `model.pt`), built once; never change it."""
    from pipeline.training.config import TrainConfig
    from pipeline.training.train import run_train

    out = tmp_path_factory.mktemp("refiner")
    config = TrainConfig(
        store=str(base_dataset["store"]), annotations=base_dataset["annotations"], out=out, epochs=1, batch_size=2
    )
    run_train(config)
    return out / "model.pt"


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
