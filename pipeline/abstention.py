"""Do no harm: keep the coarse box wherever the refiner's score falls below a threshold.

Pure functions over one group of N boxes, each given by three N-tensors: `iou_coarse` and `iou_refined`
(each box against its ground truth) and `score` (in [0, 1], the refiner's trust in its refined box). A box
is refined when its score is at least `min_score`, otherwise its coarse box is kept. The threshold
`refine train` stores in the checkpoint comes from `choose_min_score` on held-out training images, never
from the images `evaluate` scores.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from pipeline.metrics import CHANGE_EPS

# Thresholds tried when one is chosen, and those `risk_coverage` reports.
CHOICE_GRID = torch.linspace(0.0, 1.0, 201, dtype=torch.float64)
REPORT_GRID = torch.linspace(0.0, 1.0, 21, dtype=torch.float64)
RELIABILITY_BINS = 10


def written_iou(iou_coarse: Tensor, iou_refined: Tensor, score: Tensor, min_score: float) -> Tensor:
    """The IoU of the box `apply` writes: the refined one where score >= min_score, else the coarse one (N)."""
    return torch.where(score >= min_score, iou_refined, iou_coarse)


def _operating_point(iou_coarse: Tensor, iou_refined: Tensor, score: Tensor, min_score: float) -> dict[str, float]:
    changed = score >= min_score
    written = torch.where(changed, iou_refined, iou_coarse)
    return {
        "min_score": float(min_score),
        "share_changed": changed.double().mean().item(),
        "share_worse": (written < iou_coarse - CHANGE_EPS).double().mean().item(),
        "mean_iou": written.double().mean().item(),
    }


def risk_coverage(
    iou_coarse: Tensor, iou_refined: Tensor, score: Tensor, thresholds: Tensor = REPORT_GRID
) -> list[dict[str, float]]:
    """For each threshold: the share of boxes changed, the share made worse and the mean IoU written.

    An empty group gives an empty list.
    """
    if len(score) == 0:
        return []
    return [_operating_point(iou_coarse, iou_refined, score, float(t)) for t in thresholds]


def choose_min_score(iou_coarse: Tensor, iou_refined: Tensor, score: Tensor, max_worse: float) -> dict[str, Any]:
    """The threshold with the highest mean IoU among those that make at most `max_worse` of the boxes worse.

    Returns that operating point (`risk_coverage`'s keys) with "max_worse", "boxes" and "reached"; where
    no threshold meets `max_worse` (it is then never met, not even by refining nothing), the threshold
    that makes the fewest boxes worse, with "reached" False. No boxes: threshold 0 (refine everything).
    """
    if len(score) == 0:
        return {"min_score": 0.0, "max_worse": max_worse, "boxes": 0, "reached": False}
    points = risk_coverage(iou_coarse, iou_refined, score, CHOICE_GRID)
    allowed = [p for p in points if p["share_worse"] <= max_worse]
    # Ties keep the lowest threshold: it changes the most boxes for the same mean IoU.
    best = max(allowed, key=lambda p: p["mean_iou"]) if allowed else min(points, key=lambda p: p["share_worse"])
    return {**best, "max_worse": max_worse, "boxes": len(score), "reached": bool(allowed)}


def auroc(score: Tensor, worse: Tensor) -> float | None:
    """How well a low score picks out the boxes made worse: the chance that a box made worse scores below a box
    that was not (ties count half; the Mann-Whitney statistic over average ranks). None without both kinds."""
    worse = worse.bool()
    bad, good = int(worse.sum()), int((~worse).sum())
    if bad == 0 or good == 0:
        return None
    _, inverse, counts = torch.unique(score.double(), return_inverse=True, return_counts=True)
    # Average rank (1-based) of each distinct value, then of each box; ties share their average.
    upper = counts.cumsum(0).double()
    ranks = (upper - (counts.double() - 1) / 2)[inverse]
    rank_sum_good = ranks[~worse].sum().item()
    return (rank_sum_good - good * (good + 1) / 2) / (good * bad)


def reliability(predicted: Tensor, actual: Tensor, bins: int = RELIABILITY_BINS) -> list[dict[str, Any]]:
    """Predicted against actual in equal-width bins of the prediction over [0, 1]: one row per non-empty bin,
    {"low", "high", "count", "mean_predicted", "mean_actual"}."""
    index = (predicted.double() * bins).floor().clamp(0, bins - 1).long()
    rows = []
    for b in range(bins):
        inside = index == b
        count = int(inside.sum())
        if count:
            rows.append(
                {
                    "low": b / bins,
                    "high": (b + 1) / bins,
                    "count": count,
                    "mean_predicted": predicted[inside].double().mean().item(),
                    "mean_actual": actual[inside].double().mean().item(),
                }
            )
    return rows
