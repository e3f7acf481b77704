"""Box quality metrics: paired IoU of coarse and refined boxes against ground truth, and COCO AP.

Pure functions over boxes: no model, no store. Boxes are `xyxy` pixel tensors (N x 4); every IoU comes
from `torchvision.ops.box_iou`, every AP from pycocotools' `COCOeval`. The returned dicts hold only
Python floats, ints and None, so they go straight to JSON (`write_metrics`).
"""

from __future__ import annotations

import contextlib
import io
import math
from pathlib import Path
from typing import Any

import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor
from torchvision.ops import box_area, box_iou

from pipeline.errors import RefineError
from pipeline.jsonio import write_json

# A refined box counts as improved (or worse) only when its IoU moves by more than this. Boxes that pass
# through float32 coordinate-frame conversions unchanged move their IoU by ~1e-7; a change of 1e-4 IoU is a
# few thousandths of a pixel on a 100 px box, so nothing below it is a real change.
CHANGE_EPS = 1e-4

# "Recall at IoU t": the share of boxes whose IoU with their ground-truth box is >= t (COCOeval also
# matches at IoU >= t).
RECALL_THRESHOLDS = (0.5, 0.75, 0.9)

# COCO size buckets by area in pixels: small < 32², medium < 96², large otherwise. (COCOeval's own ranges
# are closed on both ends, so an area of exactly 32² counts in both there; here each box has one bucket.)
SIZE_BUCKETS: dict[str, tuple[float, float]] = {
    "small": (0.0, 32.0**2),
    "medium": (32.0**2, 96.0**2),
    "large": (96.0**2, math.inf),
}

# box_iou is pairwise (N x M) and only its diagonal is wanted: chunks keep memory and work at N x CHUNK
# instead of N x N, while the IoU itself stays torchvision's.
IOU_CHUNK = 64

# COCOeval.stats positions of the values reported by `coco_ap`.
COCO_STATS = {"AP": 0, "AP50": 1, "AP75": 2, "AP_small": 3, "AP_medium": 4, "AP_large": 5}

METRIC_DECIMALS = 6

# `image_bootstrap`: the share of resampled figures its interval holds, and how many resamples it draws.
INTERVAL_LEVEL = 0.9
BOOTSTRAP_RESAMPLES = 2000


def improved(iou_coarse: Tensor, iou_refined: Tensor) -> Tensor:
    """N bools: the refined box is closer to the truth than the coarse box was (by more than CHANGE_EPS)."""
    return iou_refined > iou_coarse + CHANGE_EPS


def made_worse(iou_coarse: Tensor, iou_refined: Tensor) -> Tensor:
    """N bools: the refined box is further from the truth than the coarse box was (by more than CHANGE_EPS)."""
    return iou_refined < iou_coarse - CHANGE_EPS


def paired_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU of row i of `boxes1` (N x 4 xyxy) with row i of `boxes2` (N x 4 xyxy) -> N, in [0, 1].

    A box with no area (zero-size or inverted corners) overlaps nothing: its IoU is 0, not NaN.
    """
    parts = [
        box_iou(boxes1[start : start + IOU_CHUNK], boxes2[start : start + IOU_CHUNK]).diagonal()
        for start in range(0, len(boxes1), IOU_CHUNK)
    ]
    iou = torch.cat(parts) if parts else boxes1.new_zeros(0)
    return torch.nan_to_num(iou, nan=0.0).clamp_(0.0, 1.0)


def box_metrics(gt: Tensor, coarse: Tensor, refined: Tensor, areas: Tensor | None = None) -> dict[str, Any]:
    """Quality of coarse and refined boxes against their ground-truth boxes, overall and by object size.

    gt, coarse, refined: N x 4 xyxy pixels; row i of each is the same object.
    areas: N ground-truth annotation areas (COCO `area`) for the size buckets; None uses the GT box area.

    Returns {"count", "mean_iou_coarse", "mean_iou_refined", "share_improved", "share_worse",
    "recall_at_iou": {"coarse": {"0.5", "0.75", "0.9"}, "refined": {...}},
    "by_size": {"small" | "medium" | "large": the same keys without "by_size"}}.
    A group with no boxes has count 0 and None for every value.
    """
    gt, coarse, refined = (_boxes(name, t) for name, t in (("gt", gt), ("coarse", coarse), ("refined", refined)))
    if not len(gt) == len(coarse) == len(refined):
        raise RefineError(
            f"box_metrics: gt, coarse and refined must pair up, got {len(gt)}, {len(coarse)} and {len(refined)} boxes"
        )
    if areas is None:
        areas = box_area(gt)
    elif areas.shape != (len(gt),):
        raise RefineError(f"box_metrics: areas must have shape ({len(gt)},), got {tuple(areas.shape)}")
    else:
        areas = areas.detach().to("cpu", torch.float64)
        if not torch.isfinite(areas).all():  # a NaN area would fall in no size bucket
            raise RefineError("box_metrics: areas has a NaN or infinite value")
    iou_coarse = paired_iou(gt, coarse)
    iou_refined = paired_iou(gt, refined)
    metrics = iou_summary(iou_coarse, iou_refined)
    metrics["by_size"] = {}
    for name, (low, high) in SIZE_BUCKETS.items():
        keep = (areas >= low) & (areas < high)
        metrics["by_size"][name] = iou_summary(iou_coarse[keep], iou_refined[keep])
    return metrics


def _boxes(name: str, boxes: Tensor) -> Tensor:
    """Check an N x 4 box tensor and return it as float64 on the CPU (exact thresholds, no device syncs later)."""
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise RefineError(f"box_metrics: {name} must be N x 4 xyxy boxes, got shape {tuple(boxes.shape)}")
    boxes = boxes.detach().to("cpu", torch.float64)
    if not torch.isfinite(boxes).all():
        raise RefineError(f"box_metrics: {name} has a NaN or infinite coordinate")
    return boxes


def iou_summary(iou_coarse: Tensor, iou_refined: Tensor) -> dict[str, Any]:
    """Metrics of one group of boxes from their paired IoUs with the ground truth (N each): the keys of
    `box_metrics` without "by_size"; None for every value when the group is empty."""
    count = len(iou_coarse)

    def share(mask: Tensor) -> float | None:
        return mask.double().mean().item() if count else None

    return {
        "count": count,
        "mean_iou_coarse": iou_coarse.mean().item() if count else None,
        "mean_iou_refined": iou_refined.mean().item() if count else None,
        "share_improved": share(improved(iou_coarse, iou_refined)),
        "share_worse": share(made_worse(iou_coarse, iou_refined)),
        "recall_at_iou": {
            kind: {f"{t:g}": share(iou >= t) for t in RECALL_THRESHOLDS}
            for kind, iou in (("coarse", iou_coarse), ("refined", iou_refined))
        },
    }


def image_bootstrap(
    iou_coarse: Tensor,
    iou_refined: Tensor,
    image_index: Tensor,
    resamples: int = BOOTSTRAP_RESAMPLES,
    level: float = INTERVAL_LEVEL,
    seed: int = 0,
) -> dict[str, Any] | None:
    """How far the mean IoU gain and the share made worse could move on other images like these: percentile
    intervals over `resamples` draws of the images with replacement (N IoUs each, `image_index` N ints in
    0 .. images - 1). Whole images are drawn, not boxes: boxes of one image share its difficulty, so
    resampling boxes would understate the spread. None for an empty group."""
    if len(iou_coarse) == 0:
        return None
    images = int(image_index.max()) + 1
    gain = iou_refined.double() - iou_coarse.double()
    worse = made_worse(iou_coarse, iou_refined).double()
    per_image = torch.zeros(3, images, dtype=torch.float64)
    for row, values in enumerate((gain, worse, torch.ones_like(gain))):
        per_image[row].index_add_(0, image_index, values)
    generator = torch.Generator().manual_seed(seed)
    drawn = torch.randint(images, (resamples, images), generator=generator)
    counts = torch.zeros(resamples, images, dtype=torch.float64).scatter_add_(
        1, drawn, torch.ones(resamples, images, dtype=torch.float64)
    )
    sums = counts @ per_image.T  # resamples x 3: gain, worse, boxes
    boxes = sums[:, 2].clamp_min(1.0)
    quantiles = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)

    def interval(values: Tensor) -> list[float]:
        return torch.quantile(values, quantiles).tolist()

    return {
        "level": level,
        "resamples": resamples,
        "mean_iou_gain": interval(sums[:, 0] / boxes),
        "share_worse": interval(sums[:, 1] / boxes),
    }


def coco_ap(gt_coco: dict[str, Any], detections: list[dict[str, Any]]) -> dict[str, float | None]:
    """COCO bbox AP of `detections` against the dataset `gt_coco`, evaluated in memory.

    gt_coco: a COCO dataset dict (images, annotations with bbox and optionally area / iscrowd, categories).
    detections: COCO results, [{"image_id", "category_id", "bbox": [x, y, w, h], "score"}]; not modified.

    Returns {"AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large"}: floats, None where COCOeval has
    nothing to measure (-1, e.g. no ground-truth box of that size). No detections give AP 0.0.
    """
    image_ids = {image["id"] for image in gt_coco.get("images", [])}
    for index, detection in enumerate(detections):
        if detection.get("image_id") not in image_ids:
            image_id = detection.get("image_id")
            raise RefineError(f"coco_ap: detections[{index}] has image_id {image_id!r}, not in the ground truth")
    # COCOeval buckets by `area` and skips `iscrowd` boxes; files without them get the box area and 0.
    annotations = [{"area": _xywh_area(a["bbox"]), "iscrowd": 0, **a} for a in gt_coco.get("annotations", [])]
    categories = gt_coco.get("categories") or [{"id": c} for c in sorted({a["category_id"] for a in annotations})]
    images = list(gt_coco.get("images", []))
    gt = _coco_index({"images": images, "annotations": annotations, "categories": categories})
    # The same fields COCO.loadRes sets for box results, built here because loadRes fails on an empty list
    # and writes ids into the caller's dicts.
    results = [{**d, "area": _xywh_area(d["bbox"]), "id": i, "iscrowd": 0} for i, d in enumerate(detections, start=1)]
    dt = _coco_index({"images": images, "annotations": results, "categories": categories})
    evaluator = COCOeval(gt, dt, iouType="bbox")
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools reports progress on stdout
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: _ap_value(evaluator.stats[i]) for name, i in COCO_STATS.items()}


def _xywh_area(bbox: list[float]) -> float:
    """Area of a COCO [x, y, w, h] box."""
    return float(bbox[2]) * float(bbox[3])


def _coco_index(dataset: dict[str, Any]) -> COCO:
    """An in-memory COCO object (no file), indexed silently."""
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _ap_value(stat: float) -> float | None:
    """COCOeval writes -1 where a value is undefined; report that as None."""
    return None if stat < 0 else float(stat)


def write_metrics(path: Path, metrics: dict[str, Any]) -> None:
    """Write metrics as JSON (atomically) that only changes when a value does: sorted keys, floats to 6 decimals."""
    write_json(path, _rounded(metrics), indent=2, sort_keys=True, allow_nan=False)


def _rounded(value: Any) -> Any:
    """Round every float in nested dicts and lists (JSON keys must be strings already)."""
    if isinstance(value, dict):
        return {key: _rounded(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(item) for item in value]
    if isinstance(value, float):
        return round(value, METRIC_DECIMALS)
    return value
