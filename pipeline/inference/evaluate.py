"""`evaluate`: how much better the refined boxes are than the coarse ones, against the ground truth."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor

from pipeline.model.abstention import auroc, reliability, risk_coverage
from pipeline.inference.apply import apply_file
from pipeline.inference.core import Proposer, load_model, recommend, refiner_proposer
from pipeline.boxes import to_original
from pipeline.coco import read_json
from pipeline.devices import resolve_device
from pipeline.errors import RefineError
from pipeline.splits import ImageBoxes, Split, coarse_and_targets, load_split
from pipeline.images import load_rgb
from pipeline.metrics import box_metrics, coco_ap, image_bootstrap, improved, made_worse, paired_iou
from pipeline.figures import BoxFigures, Interval
from pipeline.inference.eval_metrics import EvalMetrics, ScoreFigures
from pipeline.inference.overlays import save_overlays
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


def refine_split(propose: Proposer, split: Split, noise: float, seed: int, min_score: float) -> list[ImageOutcome]:
    """Refine the coarse boxes of every image of a split (its results file's, or the fixed noise draw) by a box
    method of the inference core, and recommend as `apply` does."""
    outcomes = []
    for image in split.images:
        coarse, target = coarse_and_targets(image, noise, seed, None)
        coarse = to_original(coarse, image.original_hw, image.resized_hw)
        target = to_original(target, image.original_hw, image.resized_hw)
        proposal = propose(image.entry, coarse)
        written, kept = recommend(coarse, proposal.boxes, proposal.scores, min_score, proposal.failed)
        outcomes.append(ImageOutcome(image, target, coarse, written, proposal.boxes, proposal.scores, kept))
    return outcomes


def run_evaluate(config: EvaluateConfig) -> EvalMetrics:
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
    propose = refiner_proposer(model, namespace, device)
    noise = config.noise if config.noise is not None else checkpoint.noise
    seed = config.seed if config.seed is not None else checkpoint.seed
    min_score = checkpoint.min_score(config.min_score)
    split = load_split(namespace, config.dataset or config.annotations.stem, config.annotations, config.coarse)

    per_image = refine_split(propose, split, noise, seed, min_score)
    snapped = _snapped(namespace, config, per_image, device) if "snap" in config.methods else None
    metrics = _metrics(per_image, snapped, config, min_score, split.clipped_boxes, noise, seed)
    if config.coarse is not None:
        metrics = replace(metrics, coco_ap=_coco_ap(config, propose, namespace, min_score))
    metrics.write(config.out)
    if config.images is not None and config.overlays > 0:
        items = _overlay_items(config.images, per_image, snapped)
        save_overlays(config.out / "overlays", items, config.overlays)
    return metrics


def _metrics(
    per_image: list[ImageOutcome],
    snapped: list[Tensor] | None,
    config: EvaluateConfig,
    min_score: float,
    clipped_boxes: int,
    noise: float,
    seed: int,
) -> EvalMetrics:
    """The figures of what `apply` writes, every box refined, the score, the curves, and each method's."""
    gt, coarse, written, refined, score = (
        torch.cat([getattr(row, name) for row in per_image])
        for name in ("truth", "coarse", "written", "refined", "score")
    )
    iou_coarse, iou_refined = paired_iou(gt, coarse), paired_iou(gt, refined)
    image_index = torch.cat([torch.full((len(row.truth),), i, dtype=torch.int64) for i, row in enumerate(per_image)])
    written_iou = paired_iou(gt, written)
    by_method = {"coarse": coarse, "refiner": written, "snap": torch.cat(snapped) if snapped is not None else None}
    return EvalMetrics(
        written=BoxFigures.from_json(box_metrics(gt, coarse, written)),
        written_interval=Interval.from_json(image_bootstrap(iou_coarse, written_iou, image_index)),
        every_box=BoxFigures.from_json(box_metrics(gt, coarse, refined)),
        every_box_interval=Interval.from_json(image_bootstrap(iou_coarse, iou_refined, image_index)),
        abstention=ScoreFigures(
            min_score=min_score,
            min_score_source="given" if config.min_score is not None else "checkpoint (held-out training images)",
            share_changed=(score >= min_score).double().mean().item(),
            auroc_worse=auroc(score, made_worse(iou_coarse, iou_refined)),
        ),
        images=len(per_image),
        clipped_boxes=clipped_boxes,
        coarse_source="results file" if config.coarse else f"noise protocol r={noise}, seed {seed}",
        risk_coverage=risk_coverage(iou_coarse, iou_refined, score),
        # The score is the chance that the refined box beats the coarse one: against how often it does.
        reliability=reliability(score, improved(iou_coarse, iou_refined).double()),
        # Each method's boxes scored as the refiner's are at the top level: mean_iou_refined is the method's.
        methods={name: BoxFigures.from_json(box_metrics(gt, coarse, by_method[name])) for name in config.methods},
    )


def _coco_ap(config: EvaluateConfig, propose: Proposer, namespace: Namespace, min_score: float) -> dict[str, Any]:
    """COCO AP of the results file's detections, before and after `apply`."""
    ground_truth = read_json(config.annotations)
    assert config.coarse is not None
    detections = read_json(config.coarse)
    refined_detections, _ = apply_file(propose, namespace, config.coarse, config.dataset, min_score)
    return {"coarse": coco_ap(ground_truth, detections), "refined": coco_ap(ground_truth, refined_detections)}


def _snapped(
    namespace: Namespace, config: EvaluateConfig, per_image: list[ImageOutcome], device: torch.device
) -> list[Tensor]:
    """Every image's coarse boxes snapped by HQ-SAM (N_i x 4 each), with the weights that made the namespace."""
    # HQ-SAM's decoder loads only when snap is asked for: the refiner alone needs none of it.
    from pipeline.inference.snap import snap_method

    snap = snap_method(namespace, config.snap_checkpoint, device)
    return [snap(row.image.entry, row.coarse).boxes for row in per_image]


def _overlay_items(image_root: Path, per_image: list[ImageOutcome], snapped: list[Tensor] | None) -> Iterator[tuple]:
    for index, row in enumerate(per_image):
        picture = load_rgb(image_root / row.image.file_name)
        snap = snapped[index] if snapped is not None else None
        yield Path(row.image.file_name).stem, picture, row.truth, row.coarse, row.written, snap
