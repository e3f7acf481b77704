"""`refine train`: checkpoints, reproducibility, exact resume, independence from images and the encoder,
clear errors, and the box helpers it is built on."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision.ops import box_iou
from typer.testing import CliRunner

from pipeline.manifest import manifest_images
from pipeline.boxes import (
    MAX_NOISE,
    clip_to_image,
    coco_to_xyxy,
    jitter_boxes,
    match_to_ground_truth,
    noise_generator,
    seeded_generator,
    to_input,
    to_original,
    xyxy_to_coco,
)
from pipeline.model.checkpoints import CHECKPOINT, Checkpoint
from pipeline.training.config import TrainConfig
from pipeline.devices import resolve_amp
from pipeline.hqsam.encoder import identity_for
from pipeline.training.engine import TrainProgress
from pipeline.errors import RefineError
from pipeline.store import FeatureStore, Namespace
from pipeline.store.writer import SegmentWriter
from pipeline.training.train import run_train
from pipeline.model.train_metrics import METRICS_FILE, TrainMetrics
from stages.train import train

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--epochs", "2", "--batch-size", "2", "--jitters", "2"]

train_app = typer.Typer(pretty_exceptions_enable=False)
train_app.command("train")(train)


@train_app.callback()
def _group() -> None:
    """Keeps `train` a named sub-command, as in the `refine` CLI."""


def run_cli(*args: object):
    return CliRunner().invoke(train_app, ["train", *(str(a) for a in args)])


def config(data: dict, out: Path, **overrides: object) -> TrainConfig:
    values = {"epochs": 3, "batch_size": 2, "jitters": 2, **overrides}
    return TrainConfig(store=str(data["store"]), annotations=data["annotations"], out=out, **values)  # type: ignore[arg-type]


# -- training -----------------------------------------------------------------------------------------
def test_train_writes_a_safe_checkpoint_metrics_and_curves(base_dataset: dict, tmp_path: Path) -> None:
    out = tmp_path / "refiner"
    result = run_cli(
        "--store", base_dataset["store"], "--annotations", base_dataset["annotations"], "--out", out, *FAST
    )
    assert result.exit_code == 0, result.output
    assert "val mean IoU" in result.stdout

    checkpoint = torch.load(out / CHECKPOINT, map_location="cpu", weights_only=True)
    assert {"model", "optimizer", "scaler", "epoch", "config", "refiner", "fingerprint", "encoder", "metrics"} <= set(
        checkpoint
    )
    assert checkpoint["epoch"] == 2
    assert checkpoint["encoder"] == {"model_type": "vit_tiny", "early_channels": 160}
    namespace = FeatureStore(base_dataset["store"]).fingerprints()
    assert checkpoint["fingerprint"] in namespace
    assert checkpoint["config"]["noise"] == 0.2 and checkpoint["config"]["store"] == str(base_dataset["store"])
    assert checkpoint["scaler"] is None  # fp32 on CPU: no GradScaler
    # The whitening statistics measured on the training set travel with the weights.
    assert not torch.equal(checkpoint["model"]["early.norm.matrix"], torch.eye(160))
    assert not torch.equal(checkpoint["model"]["embedding_norm.matrix"], torch.eye(256))

    metrics = json.loads((out / METRICS_FILE).read_text())
    assert metrics["epoch"] == 2 and 0.0 < metrics["val"]["mean_iou_coarse"] < 1.0
    assert metrics["val"]["share_improved"] + metrics["val"]["share_worse"] <= 1.0
    # One type writes and reads the file, and its record is the checkpoint's, key for key.
    assert TrainMetrics.read(out / METRICS_FILE).to_json() == metrics == checkpoint["metrics"]
    (out / METRICS_FILE).write_text(json.dumps({**metrics, "val": {"count": 3}}))
    with pytest.raises(RefineError, match=rf"^{re.escape(str(out / METRICS_FILE))}: not a refine train_metrics.json"):
        TrainMetrics.read(out / METRICS_FILE)
    curve = (out / "live" / "plots" / "metrics" / "val" / "mean_iou_refined.tsv").read_text().splitlines()
    assert len(curve) == 1 + 2  # header and one row per epoch
    assert not (out / "live" / "dvc.yaml").exists()  # plots are declared in the project's dvc.yaml


def test_same_seed_same_run_and_resume_is_exact(base_dataset: dict, tmp_path: Path) -> None:
    reference = run_train(config(base_dataset, tmp_path / "a"))
    again = run_train(config(base_dataset, tmp_path / "b", workers=1))  # worker processes change nothing
    assert again.metrics == reference.metrics

    def stop_in_epoch_2(event: TrainProgress) -> None:
        if event.phase == "train" and event.epoch == 2:
            raise KeyboardInterrupt  # as if the run were killed during epoch 2

    with pytest.raises(KeyboardInterrupt):
        run_train(config(base_dataset, tmp_path / "c"), stop_in_epoch_2)
    assert torch.load(tmp_path / "c" / CHECKPOINT, weights_only=True)["epoch"] == 1
    resumed = run_train(config(base_dataset, tmp_path / "c", resume=True))
    assert resumed.start_epoch == 1 and resumed.epochs_run == 2
    assert resumed.metrics == reference.metrics
    final = torch.load(tmp_path / "c" / CHECKPOINT, weights_only=True)["model"]
    expected = torch.load(tmp_path / "a" / CHECKPOINT, weights_only=True)["model"]
    assert all(torch.equal(final[name], expected[name]) for name in expected)


def test_train_reads_only_the_store(dataset: dict) -> None:
    """No image file, no encoder package, no extraction code: train runs from the store and the annotations alone."""
    shutil.rmtree(dataset["images"])
    script = (
        # imports of the encoder package and of extraction fail
        "import sys; sys.modules['segment_anything_hq'] = sys.modules['pipeline.extraction'] = None\n"
        "from tests.test_train import train_app\n"
        "train_app(sys.argv[1:])\n"
    )
    args = [
        "train",
        "--store",
        dataset["store"],
        "--annotations",
        dataset["annotations"],
        "--out",
        dataset["root"] / "out",
        *FAST,
    ]
    result = subprocess.run(
        [sys.executable, "-c", script, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert (dataset["root"] / "out" / CHECKPOINT).is_file()


def test_coarse_boxes_from_a_results_file(base_dataset: dict, tmp_path: Path) -> None:
    coco = json.loads(base_dataset["annotations"].read_text())
    detections, shifted = [], []
    for annotation in coco["annotations"]:
        x, y, w, h = annotation["bbox"]
        shifted.append([x + 0.1 * w, y, w, 0.9 * h])
        detections.append({"image_id": annotation["image_id"], "category_id": 1, "bbox": shifted[-1], "score": 0.9})
        # Far from every object: no ground truth to learn from, so it is not a training pair.
        detections.append({"image_id": annotation["image_id"], "category_id": 1, "bbox": [0, 0, 3, 3], "score": 0.1})
    results = tmp_path / "detections.json"
    results.write_text(json.dumps(detections))
    summary = run_train(config(base_dataset, tmp_path / "out", epochs=1, coarse=results, val_coarse=results))
    assert summary.metrics is not None
    assert summary.train.boxes == summary.metrics.val.count == len(coco["annotations"])
    gt = coco_to_xyxy([a["bbox"] for a in coco["annotations"]])
    expected = box_iou(coco_to_xyxy(shifted), gt).diagonal().mean().item()
    assert summary.metrics.val.mean_iou_coarse == pytest.approx(expected, abs=1e-4)

    detections.append({"image_id": 999, "category_id": 1, "bbox": [1, 1, 5, 5], "score": 0.5})
    results.write_text(json.dumps(detections))
    with pytest.raises(RefineError, match=rf"detections.json: detection \[{len(detections) - 1}\]: image_id 999"):
        run_train(config(base_dataset, tmp_path / "out", epochs=1, coarse=results))


# -- clear errors -------------------------------------------------------------------------------------
def test_a_diverging_run_stops_naming_epoch_and_step(base_dataset: dict, tmp_path: Path) -> None:
    result = run_cli(
        "--store",
        base_dataset["store"],
        "--annotations",
        base_dataset["annotations"],
        "--out",
        tmp_path,
        *FAST,
        "--lr",
        "1e30",
    )
    assert result.exit_code == 1
    assert "training loss is nan at epoch 1, step 2 of 2" in result.stderr
    assert "Traceback" not in result.output


def test_damaged_features_stop_naming_the_entry(dataset: dict, tmp_path: Path) -> None:
    """A bit flip on disk that makes a stored value infinite is named, not trained on."""
    store = FeatureStore(dataset["store"])
    namespace = Namespace.open(store, store.fingerprints()[0])
    entry = next(iter(namespace.entries().values()))
    early = zarr.open_array(store.zarr_store, path=f"{namespace.fingerprint}/segments/{entry.segment}/early", mode="r+")
    early[entry.row, 0, 0, 0] = np.inf
    result = run_cli("--store", dataset["store"], "--annotations", dataset["annotations"], "--out", tmp_path, *FAST)
    assert result.exit_code == 1
    assert (
        f"entry {entry.key}" in result.stderr
        and "NaN or infinite" in result.stderr
        and "repair: `refine extract" in result.stderr
    )


def test_images_missing_from_the_store_are_named_with_the_command_to_run(dataset: dict, tmp_path: Path) -> None:
    coco = json.loads(dataset["annotations"].read_text())
    coco["images"].append({"id": 99, "file_name": "late.png", "width": 50, "height": 40})
    coco["annotations"].append({"id": 9900, "image_id": 99, "category_id": 1, "bbox": [5, 5, 20, 20]})
    dataset["annotations"].write_text(json.dumps(coco))
    result = run_cli("--store", dataset["store"], "--annotations", dataset["annotations"], "--out", tmp_path, *FAST)
    assert result.exit_code == 1
    assert "1 image(s) are not in dataset 'train'" in result.stderr and "id=99 'late.png'" in result.stderr
    assert "refine extract" in result.stderr


def test_missing_dataset_and_features_of_another_encoder(dataset: dict, tmp_path: Path) -> None:
    result = run_cli(
        "--store", dataset["store"], "--annotations", dataset["annotations"], "--dataset", "other", "--out", tmp_path
    )
    assert result.exit_code == 1 and "no dataset 'other'" in result.stderr and "refine extract" in result.stderr

    # The same dataset written again under a second encoder identity (seeded differently): now ambiguous.
    store = FeatureStore(dataset["store"])
    first = Namespace.open(store, store.fingerprints()[0])
    manifest = first.manifest("train")
    second = Namespace.ensure(store, identity_for("vit_tiny", None, seed=1).provenance())
    entries = first.entries()
    keys = manifest_images(manifest, "test").keys
    features = [first.read_with_plane(entries[key]) for key in keys]
    SegmentWriter(second, 160, len(keys)).write_batch(
        keys,
        np.stack([embedding for embedding, _, _ in features]),
        np.stack([early for _, early, _ in features]),
        [entries[key].original_size for key in keys],
        [entries[key].resized_size for key in keys],
        np.stack([plane for _, _, plane in features]),
    )
    second.write_manifest({**manifest, "fingerprint": second.fingerprint})

    common = ["--store", dataset["store"], "--annotations", dataset["annotations"], *FAST]
    result = run_cli(*common, "--out", tmp_path / "a")
    assert result.exit_code == 1 and "several encoders" in result.stderr and "--fingerprint" in result.stderr
    assert run_cli(*common, "--out", tmp_path / "a", "--fingerprint", first.fingerprint).exit_code == 0
    result = run_cli(*common, "--out", tmp_path / "a", "--fingerprint", second.fingerprint, "--resume")
    assert result.exit_code == 1
    assert f"trained on features of encoder {first.fingerprint}" in result.stderr


def test_resume_refuses_other_settings_and_amp_choices(base_dataset: dict, tmp_path: Path) -> None:
    common = ["--store", base_dataset["store"], "--annotations", base_dataset["annotations"], "--out", tmp_path, *FAST]
    assert run_cli(*common, "--resume").exit_code == 1  # nothing to resume yet
    assert run_cli(*common).exit_code == 0
    result = run_cli(*common, "--resume", "--noise", "0.1")
    assert result.exit_code == 1 and "noise: 0.2 -> 0.1" in result.stderr
    # The same options, but a refine whose refiner defaults changed: refused, not loaded into another shape.
    checkpoint = Checkpoint.load(tmp_path / CHECKPOINT)
    other = dataclasses.replace(checkpoint.refiner_config, width=checkpoint.refiner_config.width + 1)
    checkpoint.check_resume(checkpoint.config, checkpoint.refiner_config, checkpoint.fingerprint, tmp_path)
    with pytest.raises(RefineError, match="--resume with another refiner shape"):
        checkpoint.check_resume(checkpoint.config, other, checkpoint.fingerprint, tmp_path)
    result = run_cli(*common, "--amp", "fp16")
    assert result.exit_code == 1 and "--amp fp16 needs a CUDA device" in result.stderr

    cpu = torch.device("cpu")
    assert resolve_amp("auto", cpu) is None and resolve_amp("off", cpu) is None
    assert resolve_amp("bf16", cpu) == torch.bfloat16
    with pytest.raises(RefineError):
        resolve_amp("fp16", cpu)


# -- box helpers --------------------------------------------------------------------------------------
sizes = st.tuples(st.integers(8, 2000), st.integers(8, 2000))


@st.composite
def images_with_boxes(draw: st.DrawFn) -> tuple[tuple[int, int], torch.Tensor]:
    """An image (height, width) and 1-8 valid xyxy boxes inside it."""
    height, width = draw(sizes)
    boxes = []
    for _ in range(draw(st.integers(1, 8))):
        x0 = draw(st.floats(0, width - 1))
        y0 = draw(st.floats(0, height - 1))
        x1 = draw(st.floats(x0 + 0.5, width))
        y1 = draw(st.floats(y0 + 0.5, height))
        boxes.append([x0, y0, x1, y1])
    return (height, width), torch.tensor(boxes, dtype=torch.float32)


@settings(max_examples=60, deadline=None)
@given(images_with_boxes(), st.floats(0, MAX_NOISE), st.integers(0, 2**31))
def test_jittered_boxes_are_valid_inside_and_overlap_their_object(
    image: tuple[tuple[int, int], torch.Tensor], r: float, seed: int
) -> None:
    (height, width), gt = image
    noisy = jitter_boxes(gt, (height, width), r, seeded_generator(seed))
    assert noisy.shape == gt.shape
    assert (noisy[:, 2:] > noisy[:, :2]).all()
    assert (noisy[:, :2] >= 0).all() and (noisy[:, 2] <= width).all() and (noisy[:, 3] <= height).all()
    assert (box_iou(noisy, gt).diagonal() > 0).all()
    again = jitter_boxes(gt, (height, width), r, seeded_generator(seed))
    assert torch.equal(noisy, again)  # the same seed gives the same noise


@settings(max_examples=60, deadline=None)
@given(images_with_boxes(), sizes)
def test_conversions_round_trip_and_iou_is_bounded(
    image: tuple[tuple[int, int], torch.Tensor], resized: tuple[int, int]
) -> None:
    original, boxes = image
    assert torch.allclose(coco_to_xyxy(xyxy_to_coco(boxes)), boxes, atol=1e-3)
    assert torch.allclose(
        to_original(to_input(boxes, original, resized), original, resized), boxes, rtol=1e-5, atol=1e-3
    )
    iou = box_iou(boxes, boxes.flip(0))
    assert ((iou >= 0) & (iou <= 1 + 1e-6)).all()
    assert torch.allclose(box_iou(boxes, boxes).diagonal(), torch.ones(len(boxes)))
    clipped = clip_to_image(boxes * 3 - 100, original)
    assert (clipped >= 0).all() and (clipped[:, 0::2] <= original[1]).all() and (clipped[:, 1::2] <= original[0]).all()


def test_noise_is_fresh_every_epoch_fixed_for_evaluation_and_matching_uses_iou() -> None:
    draws = [torch.rand(4, generator=noise_generator(0, 7, epoch)) for epoch in (0, 1, None, None)]
    assert not torch.equal(draws[0], draws[1]) and torch.equal(draws[2], draws[3])
    assert not torch.equal(draws[0], draws[2])

    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0]])
    coarse = torch.tensor([[1.0, 1.0, 11.0, 11.0], [49.0, 50.0, 60.0, 61.0], [20.0, 20.0, 30.0, 30.0]])
    kept, matched = match_to_ground_truth(coarse, gt)
    assert kept.tolist() == [0, 1] and matched.tolist() == [0, 1]
