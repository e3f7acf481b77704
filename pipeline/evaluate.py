"""`evaluate`: how much better the refined boxes are than the coarse ones, against the ground truth."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor

from pipeline.abstention import auroc, reliability, risk_coverage
from pipeline.apply import apply_to_file, load_model, recommend, refine_boxes
from pipeline.boxes import to_original
from pipeline.checkpoints import min_score_of
from pipeline.coco import read_json
from pipeline.devices import resolve_device
from pipeline.features import ImageBoxes, Split, coarse_and_targets, load_split
from pipeline.images import load_rgb
from pipeline.metrics import CHANGE_EPS, box_metrics, coco_ap, paired_iou, write_metrics
from pipeline.overlays import save_overlays
from pipeline.refiner import SimilarityCascadeRefiner
from pipeline.store import FeatureStore, Namespace


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
    min_score: float | None = None  # None: the threshold stored in the checkpoint


@dataclass
class ImageOutcome:
    """One image's boxes in original pixels (N x 4 xyxy each, row i the same object) and scores (N)."""

    image: ImageBoxes
    truth: Tensor
    coarse: Tensor
    written: Tensor  # what `apply` writes: refined, or coarse where the score is below the threshold
    refined: Tensor
    score: Tensor
    kept: Tensor  # N bools: the score was below the threshold


def refine_split(
    model: SimilarityCascadeRefiner,
    namespace: Namespace,
    split: Split,
    noise: float,
    seed: int,
    min_score: float,
    device: torch.device,
) -> list[ImageOutcome]:
    """Refine the coarse boxes of every image of a split: its results file's, or the fixed noise draw."""
    outcomes = []
    for image in split.images:
        coarse, target = coarse_and_targets(image, noise, seed, None)
        coarse = to_original(coarse, image.original_hw, image.resized_hw)
        target = to_original(target, image.original_hw, image.resized_hw)
        refined, score = refine_boxes(model, namespace, image.entry, coarse, device)
        written, kept = recommend(coarse, refined, score, min_score)
        outcomes.append(ImageOutcome(image, target, coarse, written, refined, score, kept))
    return outcomes


def run_evaluate(config: EvaluateConfig) -> dict[str, Any]:
    """Write `<out>/metrics.json`, the curves `<out>/risk_coverage.json` and `<out>/reliability.json` (and
    overlays under `<out>/overlays/`); returns the metrics.

    The top-level figures are those of the boxes `apply` writes with the same threshold (abstention
    included); "without_abstention" has the same figures with every box refined.
    """
    device = resolve_device(config.device)
    store = FeatureStore(config.store)
    model, namespace, checkpoint = load_model(config.model, store)
    model = model.to(device)
    noise = config.noise if config.noise is not None else float(checkpoint["config"]["noise"])
    seed = config.seed if config.seed is not None else int(checkpoint["config"]["seed"])
    min_score = config.min_score if config.min_score is not None else min_score_of(checkpoint)
    split = load_split(namespace, config.dataset or config.annotations.stem, config.annotations, config.coarse)

    per_image = refine_split(model, namespace, split, noise, seed, min_score, device)
    gt, coarse, written, refined, score = (
        torch.cat([getattr(row, name) for row in per_image])
        for name in ("truth", "coarse", "written", "refined", "score")
    )
    iou_coarse, iou_refined = paired_iou(gt, coarse), paired_iou(gt, refined)
    metrics: dict[str, Any] = {
        **box_metrics(gt, coarse, written),
        "without_abstention": box_metrics(gt, coarse, refined),
        "abstention": {
            "min_score": min_score,
            "min_score_source": "given" if config.min_score is not None else "checkpoint (held-out training images)",
            "share_changed": (score >= min_score).double().mean().item(),
            # How well a low score picks out the boxes that refining makes worse (0.5: no better than chance).
            "auroc_worse": auroc(score, iou_refined < iou_coarse - CHANGE_EPS),
        },
        "images": len(per_image),
        "clipped_boxes": split.clipped_boxes,
        "coarse_source": "results file" if config.coarse else f"noise protocol r={noise}, seed {seed}",
    }
    curves = {
        "risk_coverage": risk_coverage(iou_coarse, iou_refined, score),
        # The score is the chance that the refined box beats the coarse one: against how often it does.
        "reliability": reliability(score, (iou_refined > iou_coarse + CHANGE_EPS).double()),
    }
    metrics.update(curves)
    if config.coarse is not None:
        ground_truth = read_json(config.annotations)
        detections = read_json(config.coarse)
        refined_detections, _ = apply_to_file(model, namespace, config.coarse, config.dataset, device, min_score)
        metrics["coco_ap"] = {
            "coarse": coco_ap(ground_truth, detections),
            "refined": coco_ap(ground_truth, refined_detections),
        }
    write_metrics(config.out / "metrics.json", metrics)
    for name, rows in curves.items():  # DVC plots read these (dvc.yaml)
        write_metrics(config.out / f"{name}.json", rows)
    if config.images is not None and config.overlays > 0:
        save_overlays(config.out / "overlays", _overlay_items(config.images, per_image), config.overlays)
    return metrics


def _overlay_items(image_root: Path, per_image: list[ImageOutcome]) -> Iterator[tuple]:
    for row in per_image:
        picture = load_rgb(image_root / row.image.file_name)
        yield Path(row.image.file_name).stem, picture, row.truth, row.coarse, row.written
