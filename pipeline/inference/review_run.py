"""`refine review`: a trained refiner's changes to a box file, or to a split with ground truth, as a review page.

The cards (`pipeline.inference.review`) hold boxes in original pixels (xyxy); strings and ids are taken from the
input files as they are, and the page escapes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pipeline.inference.apply import RefinedFile, propose_file
from pipeline.inference.core import load_model, refiner_proposer
from pipeline.coco import CocoDataset, load_coco
from pipeline.devices import resolve_device
from pipeline.inference.evaluate import ImageOutcome, refine_split
from pipeline.splits import load_split
from pipeline.metrics import iou_summary, paired_iou
from pipeline.inference.review import write_review
from pipeline.inference.review_cards import ReviewCard
from pipeline.store import FeatureStore


@dataclass
class ReviewConfig:
    store: str
    model: Path
    images: Path
    out: Path
    boxes: Path | None = None  # a results list or dataset to refine (no ground truth)
    annotations: Path | None = None  # ground truth: its boxes are refined from the fixed noise draw
    dataset: str | None = None
    min_score: float | None = None  # None: the checkpoint's threshold
    device: str = "auto"


def run_review(config: ReviewConfig) -> tuple[float, dict[str, str]]:
    """Write the review folder; returns the threshold used and the figures in the page's header."""
    device = resolve_device(config.device)
    model, namespace, checkpoint = load_model(config.model, FeatureStore(config.store))
    propose = refiner_proposer(model, namespace, device)
    min_score = checkpoint.min_score(config.min_score)
    if config.boxes is not None:
        result = propose_file(propose, namespace, config.boxes, config.dataset, min_score)
        categories = result.data.get("categories") if isinstance(result.data, dict) else None
        cards = cards_from_file(result, category_names(categories))
        source = config.boxes.name
    else:
        assert config.annotations is not None
        split = load_split(namespace, config.dataset or config.annotations.stem, config.annotations)
        noise, seed = checkpoint.noise, checkpoint.seed
        outcomes = refine_split(propose, split, noise, seed, min_score)
        coco = load_coco(config.annotations)
        cards = cards_from_outcomes(outcomes, coco, category_names(coco.categories))
        source = f"{config.annotations.name} (coarse boxes: noise r={noise}, seed {seed})"
    figures = _figures(cards, min_score, config.min_score is not None)
    write_review(config.out, config.images, cards, figures, title=f"refine review: {source}")
    return min_score, figures


def _figures(cards: list[ReviewCard], min_score: float, given: bool) -> dict[str, str]:
    count = len(cards)
    kept = sum(card.kept_coarse for card in cards)
    figures = {
        "boxes": str(count),
        "changed": f"{count - kept} ({(count - kept) / max(count, 1):.1%})",
        "kept coarse": f"{kept} ({kept / max(count, 1):.1%})",
        "min score": f"{min_score:.3f} ({'given' if given else 'from training'})",
    }
    judged = [c for c in cards if c.iou_coarse is not None and c.iou_refined is not None]
    if judged:
        summary = iou_summary(
            torch.tensor([c.iou_coarse for c in judged], dtype=torch.float64),
            torch.tensor([c.iou_refined for c in judged], dtype=torch.float64),
        )  # the same rule for "improved" and "worse" as evaluate's
        figures["mean IoU"] = f"{summary['mean_iou_coarse']:.3f} -> {summary['mean_iou_refined']:.3f}"
        figures["improved"] = f"{summary['share_improved']:.1%}"
        figures["worse"] = f"{summary['share_worse']:.1%}"
    return figures


def category_names(categories: Any) -> dict[Any, str]:
    """Category id -> name from a COCO dataset's `categories` list (none for anything else)."""
    if not isinstance(categories, list):
        return {}
    return {c.get("id"): str(c.get("name", c.get("id"))) for c in categories if isinstance(c, dict)}


def _box(row: Tensor) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = (float(v) for v in row.tolist())
    return x0, y0, x1, y1


def cards_from_file(result: RefinedFile, names: dict[Any, str]) -> list[ReviewCard]:
    """One card per box of a refined results list or dataset, without ground truth."""
    cards = []
    for row, index in enumerate(result.order):
        record = result.box_file.records[index]
        category = record.get("category_id")
        image = result.images[row]
        cards.append(
            ReviewCard(
                image_file=image.file_name,
                image_id=image.id,
                box_id=record.get("id", index) if result.box_file.kind == "annotation" else index,
                category=names.get(category, str(category)),
                coarse=_box(result.coarse[row]),
                refined=_box(result.written[row]),
                proposed=_box(result.refined[row]),
                score=float(result.score[row]),
                kept_coarse=bool(result.kept[row]),
            )
        )
    return cards


def cards_from_outcomes(outcomes: list[ImageOutcome], coco: CocoDataset, names: dict[Any, str]) -> list[ReviewCard]:
    """One card per ground-truth box refined from its coarse version (one noise draw per box, as `evaluate`)."""
    annotations: dict[int, list] = {}
    for annotation in coco.annotations:  # in file order, as the split's ground truth
        annotations.setdefault(annotation.image_id, []).append(annotation)
    cards = []
    for outcome in outcomes:
        image = outcome.image
        iou_coarse = paired_iou(outcome.truth, outcome.coarse).tolist()
        iou_written = paired_iou(outcome.truth, outcome.written).tolist()
        for row, annotation in enumerate(annotations[image.image_id]):
            cards.append(
                ReviewCard(
                    image_file=image.file_name,
                    image_id=image.image_id,
                    box_id=annotation.id,
                    category=names.get(annotation.category_id, str(annotation.category_id)),
                    coarse=_box(outcome.coarse[row]),
                    refined=_box(outcome.written[row]),
                    proposed=_box(outcome.refined[row]),
                    score=float(outcome.score[row]),
                    kept_coarse=bool(outcome.kept[row]),
                    truth=_box(outcome.truth[row]),
                    iou_coarse=iou_coarse[row],
                    iou_refined=iou_written[row],
                )
            )
    return cards
