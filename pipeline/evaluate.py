"""`evaluate`: how much better the refined boxes are than the coarse ones, against the ground truth."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from pipeline.apply import apply_to_file, load_model, refine_boxes
from pipeline.boxes import to_original
from pipeline.coco import read_json
from pipeline.devices import resolve_device
from pipeline.features import coarse_and_targets, load_split
from pipeline.images import load_rgb
from pipeline.metrics import box_metrics, coco_ap, write_metrics
from pipeline.overlays import save_overlays
from pipeline.store import FeatureStore


@dataclass
class EvaluateConfig:
    store: str
    annotations: Path
    model: Path
    out: Path
    coarse: Path | None = None  # COCO results file; None: the noise protocol, fixed draw
    images: Path | None = None  # image root, for the overlays only
    dataset: str | None = None
    noise: float | None = None  # None: the noise the model was trained with
    seed: int | None = None  # None: the training seed
    overlays: int = 8
    device: str = "auto"


def run_evaluate(config: EvaluateConfig) -> dict[str, Any]:
    """Write `<out>/metrics.json` (and overlays under `<out>/overlays/`); returns the metrics."""
    device = resolve_device(config.device)
    store = FeatureStore(config.store)
    model, namespace, checkpoint = load_model(config.model, store)
    model = model.to(device)
    noise = config.noise if config.noise is not None else float(checkpoint["config"]["noise"])
    seed = config.seed if config.seed is not None else int(checkpoint["config"]["seed"])
    split = load_split(namespace, config.dataset or config.annotations.stem, config.annotations, config.coarse)

    per_image = []
    for image in split.images:
        coarse, target = coarse_and_targets(image, noise, seed, None)
        coarse = to_original(coarse, image.original_hw, image.resized_hw)
        target = to_original(target, image.original_hw, image.resized_hw)
        refined = refine_boxes(model, namespace, image.entry, coarse, device)
        per_image.append((image, target, coarse, refined))
    gt, coarse, refined = (torch.cat([row[i] for row in per_image]) for i in (1, 2, 3))
    metrics: dict[str, Any] = {
        **box_metrics(gt, coarse, refined),
        "images": len(per_image),
        "coarse_source": "results file" if config.coarse else f"noise protocol r={noise}, seed {seed}",
    }
    if config.coarse is not None:
        ground_truth = read_json(config.annotations)
        detections = read_json(config.coarse)
        refined_detections, _ = apply_to_file(model, namespace, config.coarse, config.dataset, device)
        metrics["coco_ap"] = {
            "coarse": coco_ap(ground_truth, detections),
            "refined": coco_ap(ground_truth, refined_detections),
        }
    write_metrics(config.out / "metrics.json", metrics)
    if config.images is not None and config.overlays > 0:
        save_overlays(config.out / "overlays", _overlay_items(config.images, per_image), config.overlays)
    return metrics


def _overlay_items(image_root: Path, per_image: list) -> Iterator[tuple]:
    for image, target, coarse, refined in per_image:
        yield Path(image.file_name).stem, load_rgb(image_root / image.file_name), target, coarse, refined
