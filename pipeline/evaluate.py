"""`evaluate`: how much better the refined boxes are than the coarse ones, against the ground truth."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor

from pipeline.abstention import auroc, reliability, risk_coverage
from pipeline.apply import apply_to_file, load_model, recommend, refine_boxes, refiner_proposer
from pipeline.boxes import to_original
from pipeline.checkpoints import min_score_of
from pipeline.coco import read_json
from pipeline.devices import resolve_device
from pipeline.errors import RefineError
from pipeline.features import ImageBoxes, Split, coarse_and_targets, load_split
from pipeline.images import load_rgb
from pipeline.metrics import box_metrics, coco_ap, image_bootstrap, improved, made_worse, paired_iou, write_metrics
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
    methods: tuple[str, ...] = ("refiner",)  # of METHODS, side by side under "methods"
    snap_checkpoint: Path | None = None  # HQ-SAM checkpoint that made the store; None: its seeded random init


# The box methods `evaluate --methods` compares: the coarse boxes as they are, the zero-shot HQ-SAM snap, and
# the trained refiner (with its abstention).
METHODS = ("coarse", "snap", "refiner")


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
    included); "without_abstention" has the same figures with every box refined. Each has an "interval":
    how far its mean IoU gain and share worse move when the images are resampled (`image_bootstrap`).
    """
    unknown = sorted(set(config.methods) - set(METHODS))
    if unknown or not config.methods:
        raise RefineError(
            f"--methods: unknown method(s) {', '.join(unknown) or 'none given'}; choose from {', '.join(METHODS)}"
        )
    device = resolve_device(config.device)
    store = FeatureStore(config.store)
    model, namespace, checkpoint = load_model(config.model, store)
    model = model.to(device)
    noise = config.noise if config.noise is not None else float(checkpoint["config"]["noise"])
    seed = config.seed if config.seed is not None else int(checkpoint["config"]["seed"])
    min_score = min_score_of(checkpoint, config.min_score)
    split = load_split(namespace, config.dataset or config.annotations.stem, config.annotations, config.coarse)

    per_image = refine_split(model, namespace, split, noise, seed, min_score, device)
    snapped = _snapped(namespace, config, per_image, device) if "snap" in config.methods else None
    gt, coarse, written, refined, score = (
        torch.cat([getattr(row, name) for row in per_image])
        for name in ("truth", "coarse", "written", "refined", "score")
    )
    iou_coarse, iou_refined = paired_iou(gt, coarse), paired_iou(gt, refined)
    image_index = torch.cat([torch.full((len(row.truth),), i, dtype=torch.int64) for i, row in enumerate(per_image)])
    metrics: dict[str, Any] = {
        **box_metrics(gt, coarse, written),
        "interval": image_bootstrap(iou_coarse, paired_iou(gt, written), image_index),
        "without_abstention": {
            **box_metrics(gt, coarse, refined),
            "interval": image_bootstrap(iou_coarse, iou_refined, image_index),
        },
        "abstention": {
            "min_score": min_score,
            "min_score_source": "given" if config.min_score is not None else "checkpoint (held-out training images)",
            "share_changed": (score >= min_score).double().mean().item(),
            # How well a low score picks out the boxes that refining makes worse (0.5: no better than chance).
            "auroc_worse": auroc(score, made_worse(iou_coarse, iou_refined)),
        },
        "images": len(per_image),
        "clipped_boxes": split.clipped_boxes,
        "coarse_source": "results file" if config.coarse else f"noise protocol r={noise}, seed {seed}",
    }
    curves = {
        "risk_coverage": risk_coverage(iou_coarse, iou_refined, score),
        # The score is the chance that the refined box beats the coarse one: against how often it does.
        "reliability": reliability(score, improved(iou_coarse, iou_refined).double()),
    }
    metrics.update(curves)
    by_method = {"coarse": coarse, "refiner": written, "snap": torch.cat(snapped) if snapped is not None else None}
    # Each method's boxes scored as the refiner's are at the top level: mean_iou_refined is the method's.
    metrics["methods"] = {name: box_metrics(gt, coarse, by_method[name]) for name in config.methods}
    if config.coarse is not None:
        ground_truth = read_json(config.annotations)
        detections = read_json(config.coarse)
        propose = refiner_proposer(model, namespace, device)
        refined_detections, _ = apply_to_file(propose, namespace, config.coarse, config.dataset, min_score)
        metrics["coco_ap"] = {
            "coarse": coco_ap(ground_truth, detections),
            "refined": coco_ap(ground_truth, refined_detections),
        }
    write_metrics(config.out / "metrics.json", metrics)
    for name, rows in curves.items():  # DVC plots read these (dvc.yaml)
        write_metrics(config.out / f"{name}.json", rows)
    if config.images is not None and config.overlays > 0:
        items = _overlay_items(config.images, per_image, snapped)
        save_overlays(config.out / "overlays", items, config.overlays)
    return metrics


def _snapped(
    namespace: Namespace, config: EvaluateConfig, per_image: list[ImageOutcome], device: torch.device
) -> list[Tensor]:
    """Every image's coarse boxes snapped by HQ-SAM (N_i x 4 each), with the weights that made the namespace."""
    # HQ-SAM's decoder loads only when snap is asked for: the refiner alone needs none of it.
    from pipeline.snap import build_snapper, snap_boxes

    snapper = build_snapper(namespace, config.snap_checkpoint).to(device)
    return [snap_boxes(snapper, namespace, row.image.entry, row.coarse, device).boxes for row in per_image]


def _overlay_items(image_root: Path, per_image: list[ImageOutcome], snapped: list[Tensor] | None) -> Iterator[tuple]:
    for index, row in enumerate(per_image):
        picture = load_rgb(image_root / row.image.file_name)
        snap = snapped[index] if snapped is not None else None
        yield Path(row.image.file_name).stem, picture, row.truth, row.coarse, row.written, snap
