"""Box helpers on top of `torchvision.ops`: COCO conversions, the OA-MIL noise protocol, coordinate frames.

Two coordinate frames meet here:
  - original pixels: the image as the annotation file describes it (width x height);
  - encoder-input pixels: the image resized so its longest side is 1024, at the top-left of the padded
    1024 x 1024 encoder input. A box maps between them by the per-axis factor resized / original.
All boxes are `xyxy` float tensors (N x 4) unless a name says otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import box_convert, box_iou, clip_boxes_to_image

# Largest OA-MIL noise level: up to it a jittered box overlaps its ground-truth box by at least a quarter of
# the box on each axis, so it never collapses when clipped to the image.
MAX_NOISE = 0.5
# Independent random streams of `seeded_generator`, so that no two purposes ever share draws.
SHUFFLE_STREAM, TRAIN_NOISE_STREAM, EVAL_NOISE_STREAM, HOLDOUT_STREAM = 0, 1, 2, 3


def coco_to_xyxy(bboxes: Sequence[Sequence[float]]) -> Tensor:
    """COCO `[x, y, w, h]` boxes -> N x 4 xyxy float32."""
    xywh = torch.tensor([list(b) for b in bboxes], dtype=torch.float32).reshape(-1, 4)
    return box_convert(xywh, "xywh", "xyxy")


def xyxy_to_coco(boxes: Tensor) -> list[list[float]]:
    """N x 4 xyxy -> COCO `[x, y, w, h]` lists of Python floats."""
    return box_convert(boxes.float(), "xyxy", "xywh").tolist()


def input_scale(original_hw: Sequence[int], resized_hw: Sequence[int]) -> Tensor:
    """The per-coordinate factor (x, y, x, y) that maps original pixels to encoder-input pixels (4,)."""
    sy = resized_hw[0] / original_hw[0]
    sx = resized_hw[1] / original_hw[1]
    return torch.tensor([sx, sy, sx, sy], dtype=torch.float32)


def to_input(boxes: Tensor, original_hw: Sequence[int], resized_hw: Sequence[int]) -> Tensor:
    """N x 4 boxes in original pixels -> encoder-input pixels (multiply by resized / original per axis)."""
    return boxes * input_scale(original_hw, resized_hw).to(boxes.device, boxes.dtype)


def to_original(boxes: Tensor, original_hw: Sequence[int], resized_hw: Sequence[int]) -> Tensor:
    """N x 4 boxes in encoder-input pixels -> original pixels (the inverse of `to_input`)."""
    return boxes / input_scale(original_hw, resized_hw).to(boxes.device, boxes.dtype)


def clip_to_image(boxes: Tensor, image_hw: Sequence[int]) -> Tensor:
    """N x 4 boxes clipped to an image of height x width."""
    return clip_boxes_to_image(boxes, (int(image_hw[0]), int(image_hw[1])))


def jitter_boxes(gt_xyxy: Tensor, image_hw: Sequence[int], r: float, generator: torch.Generator) -> Tensor:
    """The OA-MIL noise protocol: N x 4 ground-truth boxes -> N x 4 noisy boxes inside the image.

    Each box's centre moves by U(-r, r) * w and U(-r, r) * h, its width and height are scaled by
    1 + U(-r, r) (independently), then it is clipped to the image. For r <= MAX_NOISE the noisy box
    overlaps its ground-truth box on both axes, so it keeps a positive size after clipping.
    """
    if not 0.0 <= r <= MAX_NOISE:
        raise ValueError(f"noise level r must lie in [0, {MAX_NOISE}], got {r}")
    cxcywh = box_convert(gt_xyxy.float(), "xyxy", "cxcywh")
    u = torch.rand((gt_xyxy.shape[0], 4), generator=generator, dtype=torch.float32) * (2 * r) - r
    wh = cxcywh[:, 2:]
    centre = cxcywh[:, :2] + u[:, :2] * wh
    size = wh * (1.0 + u[:, 2:])
    noisy = box_convert(torch.cat([centre, size], dim=1), "cxcywh", "xyxy")
    return clip_to_image(noisy, image_hw)


def seeded_generator(*parts: int) -> torch.Generator:
    """A torch generator seeded from several integers (e.g. seed, epoch, image id), well mixed.

    Randomness keyed by what it is for (not by draw order) makes noise independent of batch order,
    worker count and where a run was resumed.
    """
    state = np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, dtype=np.uint32)
    generator = torch.Generator()
    generator.manual_seed(int(state[0]) << 32 | int(state[1]))
    return generator


def noise_generator(seed: int, image_id: int, epoch: int | None) -> torch.Generator:
    """The generator of one image's noisy boxes: per (seed, epoch, image) in training, fixed for evaluation."""
    if epoch is None:
        return seeded_generator(seed, EVAL_NOISE_STREAM, 0, image_id)
    return seeded_generator(seed, TRAIN_NOISE_STREAM, epoch, image_id)


def match_to_ground_truth(coarse: Tensor, gt: Tensor, threshold: float = 0.5) -> tuple[Tensor, Tensor]:
    """Pair each coarse box (N x 4) with the ground-truth box (M x 4) it overlaps most, if IoU >= threshold.

    Returns (indices into `coarse`, indices into `gt`) of the matched pairs; several coarse boxes may
    match one ground-truth box (each is a training example of its own).
    """
    if coarse.numel() == 0 or gt.numel() == 0:
        empty = torch.zeros(0, dtype=torch.int64)
        return empty, empty
    best_iou, best_gt = box_iou(coarse, gt).max(dim=1)
    keep = torch.nonzero(best_iou >= threshold).flatten()
    return keep, best_gt[keep]


def valid_boxes(refined: Tensor, fallback: Tensor, image_hw: Sequence[int], min_side: float = 1.0) -> Tensor:
    """N x 4 boxes that are always valid inside an image of height x width: finite, x0 < x1, y0 < y1.

    A refined box that is not finite, or whose sides crossed or left the image (nothing remains after
    clipping), is replaced by its `fallback` (the coarse box); a box thinner than `min_side` (or than
    the image) grows about its centre to that size, staying inside the image.
    """
    height, width = float(image_hw[0]), float(image_hw[1])
    clipped = clip_to_image(refined.float().nan_to_num(nan=-1.0, posinf=-1.0, neginf=-1.0), image_hw)
    broken = ~torch.isfinite(refined).all(dim=1) | (clipped[:, 2:] <= clipped[:, :2]).any(dim=1)
    boxes = torch.where(broken[:, None], clip_to_image(fallback.float(), image_hw), clipped)
    limit = torch.tensor([width, height], dtype=boxes.dtype)
    side = torch.minimum(torch.full_like(limit, min_side), limit)
    centre = ((boxes[:, :2] + boxes[:, 2:]) / 2).clamp(min=side / 2, max=limit - side / 2)
    low = torch.minimum(boxes[:, :2], centre - side / 2)
    high = torch.maximum(boxes[:, 2:], centre + side / 2)
    return torch.cat([low, high], dim=1)
