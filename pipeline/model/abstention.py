"""Do no harm: keep the coarse box wherever the refiner's score falls below a threshold.

Pure functions over one group of N boxes, each given by three N-tensors: `iou_coarse` and `iou_refined`
(each box against its ground truth) and `score` (in [0, 1], the refiner's trust in its refined box). A box
is refined when its score is at least `min_score`, otherwise its coarse box is kept. The threshold
`refine train` stores in the checkpoint comes from `choose_min_score` on held-out training images, never
from the images `evaluate` scores.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.metrics import made_worse

# Operating points `risk_coverage` reports: evenly spaced in the share of boxes changed.
REPORT_POINTS = 21
RELIABILITY_BINS = 10
# `choose_min_score` with images: the share worse it holds to max_worse is this quantile over this many
# resamples of the images.
CONFIDENCE = 0.9
BOOTSTRAPS = 200
# `fit_calibration` never lets the score's scale fall below this: a score that tells nothing is flattened to
# the share of boxes improved, and still keeps its order.
CALIBRATION_MIN_SCALE = 1e-3


def written_iou(iou_coarse: Tensor, iou_refined: Tensor, score: Tensor, min_score: float) -> Tensor:
    """The IoU of the box `apply` writes: the refined one where score >= min_score, else the coarse one (N)."""
    return torch.where(score >= min_score, iou_refined, iou_coarse)


def frontier(iou_coarse: Tensor, iou_refined: Tensor, score: Tensor) -> dict[str, Tensor]:
    """Every distinct operating point, from refining every box to refining none: the thresholds (each a score
    that occurs, highest first, then one above them all) and, at each, the share of boxes changed, the share
    made worse and the mean IoU written (M + 1 each, float64). Exact, in O(N log N)."""
    count = len(score)
    order = torch.argsort(score.double(), descending=True, stable=True)
    ranked = score.double()[order]
    worse = made_worse(iou_coarse, iou_refined).double()[order]
    gain = (iou_refined.double() - iou_coarse.double())[order]
    # The last box of each run of equal scores: a threshold at that score changes everything up to it.
    last = torch.ones(count, dtype=torch.bool)
    last[:-1] = ranked[1:] != ranked[:-1]
    changed = torch.arange(1, count + 1, dtype=torch.float64)[last]
    base = iou_coarse.double().sum()
    zero = torch.zeros(1, dtype=torch.float64)
    thresholds = torch.cat([torch.nextafter(ranked[:1], torch.tensor([2.0], dtype=torch.float64)), ranked[last]])
    return {
        "min_score": thresholds.flip(0),
        "share_changed": (torch.cat([zero, changed]) / count).flip(0),
        "share_worse": (torch.cat([zero, worse.cumsum(0)[last]]) / count).flip(0),
        "mean_iou": ((base + torch.cat([zero, gain.cumsum(0)[last]])) / count).flip(0),
    }


def _point(points: dict[str, Tensor], index: int) -> dict[str, float]:
    return {name: float(values[index]) for name, values in points.items()}


def risk_coverage(iou_coarse: Tensor, iou_refined: Tensor, score: Tensor) -> list[dict[str, float]]:
    """The abstention trade-off at about REPORT_POINTS thresholds, evenly spaced in the share of boxes changed
    (1 to 0): each {"min_score", "share_changed", "share_worse", "mean_iou"}. An empty group gives []."""
    if len(score) == 0:
        return []
    points = frontier(iou_coarse, iou_refined, score)
    targets = torch.linspace(1.0, 0.0, REPORT_POINTS, dtype=torch.float64)
    # The point whose share changed is closest to each target, once each.
    nearest = torch.unique_consecutive((points["share_changed"][None, :] - targets[:, None]).abs().argmin(dim=1))
    return [_point(points, int(i)) for i in nearest]


def choose_min_score(
    iou_coarse: Tensor,
    iou_refined: Tensor,
    score: Tensor,
    max_worse: float,
    groups: Tensor | None = None,
    confidence: float = CONFIDENCE,
) -> dict[str, Any]:
    """The threshold with the highest mean IoU among those that make at most `max_worse` of the boxes worse.

    With `groups` (N ints: each box's image), "at most" is asked of an upper bound on the share worse, not
    of the share itself: its `confidence` quantile over BOOTSTRAPS resamples of the images (boxes of one
    image rise and fall together, so images are what is resampled). A threshold chosen on a few dozen
    images then still holds on new ones; without `groups`, the share itself.

    Returns that operating point (`risk_coverage`'s keys, and "share_worse_bound") with "max_worse",
    "boxes" and "reached". Refining nothing makes no box worse, so the bar is always reached with boxes; ties
    keep the lowest threshold (it changes the most boxes for the same mean IoU). No boxes: threshold 0
    (refine everything), not reached.
    """
    if len(score) == 0:
        return {"min_score": 0.0, "max_worse": max_worse, "boxes": 0, "reached": False}
    points = frontier(iou_coarse, iou_refined, score)
    if groups is None:
        bound = points["share_worse"]
    else:
        bound = _worse_bound(iou_coarse, iou_refined, score, groups, confidence)
    allowed = bound <= max_worse + 1e-12
    mean = torch.where(allowed, points["mean_iou"], torch.tensor(-1.0, dtype=torch.float64))
    best = int(torch.nonzero(mean == mean.max()).min())  # the lowest threshold among the best
    return {
        **_point(points, best),
        "share_worse_bound": float(bound[best]),
        "max_worse": max_worse,
        "boxes": len(score),
        "reached": bool(allowed.any()),
    }


def _worse_bound(iou_coarse: Tensor, iou_refined: Tensor, score: Tensor, groups: Tensor, confidence: float) -> Tensor:
    """The `confidence` quantile of the share worse at each of `frontier`'s thresholds (M + 1, same order), over
    BOOTSTRAPS resamples of the groups; each resample weighs every box by how often its group was drawn."""
    order = torch.argsort(score.double(), descending=True, stable=True)
    ranked = score.double()[order]
    worse = made_worse(iou_coarse, iou_refined).double()[order]
    _, group = torch.unique(groups[order], return_inverse=True)
    last = torch.ones(len(score), dtype=torch.bool)
    last[:-1] = ranked[1:] != ranked[:-1]
    count = int(group.max()) + 1
    generator = torch.Generator().manual_seed(0)  # the same threshold every time for the same boxes
    shares = []
    for _ in range(BOOTSTRAPS):
        drawn = torch.bincount(torch.randint(count, (count,), generator=generator), minlength=count).double()
        weight = drawn[group]
        changed_worse = (weight * worse).cumsum(0)[last] / weight.sum().clamp_min(1e-12)
        shares.append(torch.cat([torch.zeros(1, dtype=torch.float64), changed_worse]).flip(0))
    return torch.stack(shares).quantile(confidence, dim=0)


def fit_calibration(logit: Tensor, better: Tensor, steps: int = 100) -> Tensor:
    """Platt scaling: the scale and bias (a 2-tensor) for which sigmoid(scale * logit + bias) best predicts
    `better` (N bools: the refined box beat the coarse one), by damped Newton steps on the log-loss.

    The targets are Platt's smoothed ones ((positives + 1) / (positives + 2) and 1 / (negatives + 2)), so that
    a held-out group where every box improved still gets finite weights. The scale is kept at least
    CALIBRATION_MIN_SCALE (the bias then refitted): calibration may flatten the score but never reverse its
    order, which the threshold relies on. No boxes: the identity (1, 0).
    """
    if len(logit) == 0:
        return torch.tensor([1.0, 0.0])
    better = better.bool()
    positives, negatives = int(better.sum()), int((~better).sum())
    target = torch.where(
        better,
        torch.tensor((positives + 1) / (positives + 2), dtype=torch.float64),
        torch.tensor(1 / (negatives + 2), dtype=torch.float64),
    )
    inputs = torch.stack([logit.double(), torch.ones(len(logit), dtype=torch.float64)], dim=1)

    def loss(weights: Tensor) -> float:
        return F.binary_cross_entropy_with_logits(inputs @ weights, target, reduction="sum").item()

    def newton(weights: Tensor, free: slice) -> Tensor:
        for _ in range(steps):
            predicted = torch.sigmoid(inputs @ weights)
            gradient = (inputs.T @ (predicted - target))[free]
            hessian = (inputs.T @ (inputs * (predicted * (1 - predicted))[:, None]))[free, free]
            step = torch.zeros(2, dtype=torch.float64)
            # A little damping: with (nearly) equal logits the scale and the bias are not told apart.
            step[free] = torch.linalg.solve(hessian + 1e-9 * torch.eye(len(gradient), dtype=torch.float64), gradient)
            size, before = 1.0, loss(weights)
            while loss(weights - size * step) > before and size > 1e-6:
                size /= 2
            weights = weights - size * step
            if (size * step).abs().max() < 1e-10:
                break
        return weights

    share = target.mean().item()
    weights = newton(torch.tensor([0.0, math.log(share / (1 - share))], dtype=torch.float64), slice(0, 2))
    if weights[0] < CALIBRATION_MIN_SCALE:
        weights[0] = CALIBRATION_MIN_SCALE
        weights = newton(weights, slice(1, 2))
    return weights.float()


def auroc(score: Tensor, worse: Tensor) -> float | None:
    """How well a low score picks out the boxes made worse: the chance that a box made worse scores below a box
    that was not (ties count half). None without both kinds."""
    worse = worse.bool()
    if worse.all() or not worse.any():
        return None
    from sklearn.metrics import roc_auc_score  # imported late: scikit-learn takes a while to import

    return float(roc_auc_score((~worse).numpy(), score.double().numpy()))


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
