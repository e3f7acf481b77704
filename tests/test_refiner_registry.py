"""A second refiner is its module and one line in `pipeline.model.registry`: train, the checkpoint, apply and
evaluate run it unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.model import registry
from pipeline.model.checkpoints import Checkpoint
from pipeline.training.config import TrainConfig
from pipeline.training.train import run_train
from tests.offset_refiner import OffsetRefiner


def test_a_registered_refiner_trains_checkpoints_applies_and_evaluates(
    monkeypatch: pytest.MonkeyPatch, base_dataset: dict, cli, tmp_path: Path
) -> None:
    monkeypatch.setitem(registry.REFINERS, "offset", "tests.offset_refiner:OffsetRefiner")
    out = tmp_path / "refiner"
    config = TrainConfig(
        store=str(base_dataset["store"]), annotations=base_dataset["annotations"], out=out, epochs=1, model="offset",
        lr=1.0, warmup_steps=0,  # Adam moves each offset by about lr per step: pixels, not rounding noise
    )  # fmt: skip
    summary = run_train(config)
    assert summary.epochs_run == 1

    checkpoint = Checkpoint.load(out / "model.pt")
    assert checkpoint.refiner_name == "offset" and isinstance(checkpoint.refiner(), OffsetRefiner)
    assert set(checkpoint.model) >= {"offset", "score.weight"}

    boxes = base_dataset["annotations"]  # a COCO dataset file: its boxes are refined in place
    applied = cli(
        "apply", "--store", base_dataset["store"], "--boxes", boxes, "--model", out / "model.pt",
        "--out", tmp_path / "refined.json", "--min-score", "0",
    )  # fmt: skip
    assert applied.exit_code == 0, applied.stderr
    written = json.loads((tmp_path / "refined.json").read_text())["annotations"]
    assert len(written) == len(json.loads(boxes.read_text())["annotations"])
    assert checkpoint.model["offset"].abs().sum() > 0  # one epoch moved the offsets...
    assert all(box["bbox"] != box["refine"]["coarse_bbox"] for box in written)  # ...and apply used them

    evaluated = cli(
        "evaluate", "--store", base_dataset["store"], "--annotations", boxes, "--model", out / "model.pt",
        "--out", tmp_path / "eval",
    )  # fmt: skip
    assert evaluated.exit_code == 0, evaluated.stderr
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["count"] == 4 and metrics["without_abstention"]["mean_iou_refined"] is not None
