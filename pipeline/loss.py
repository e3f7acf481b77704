"""The refiner's training loss: L1 + GIoU on normalised coordinates, never raw pixels, plus the score head's."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import generalized_box_iou_loss

from pipeline.metrics import improved, paired_iou
from pipeline.shapes import IMAGE_SIZE


def box_loss(stages: list[Tensor], coarse: Tensor, target: Tensor) -> Tensor:
    """L1 + GIoU, averaged over cascade stages; coordinates normalised, never raw pixels.

    stages: per stage K x 4 predicted boxes; coarse, target: K x 4 (encoder-input pixels). Returns a scalar.
    The L1 term measures each side's error relative to its coarse box's width / height (scale-free),
    the GIoU term compares boxes in image units (pixels / 1024).
    """
    size = (coarse[:, 2:] - coarse[:, :2]).clamp_min(1.0).repeat(1, 2)
    total = coarse.new_zeros(())
    for predicted in stages:
        l1 = ((predicted - target).abs() / size).sum(dim=1).mean()
        giou = generalized_box_iou_loss(predicted / IMAGE_SIZE, target / IMAGE_SIZE, reduction="mean")
        total = total + l1 + giou
    return total / len(stages)


def score_loss(score_logits: Tensor, final: Tensor, coarse: Tensor, target: Tensor) -> Tensor:
    """Binary cross-entropy of the score head (K x 2 logits) against what the final boxes (K x 4) achieved:
    their IoU with the targets (K x 4) as a soft label, and whether it beats the coarse boxes' (K x 4) IoU.
    Returns a scalar; no gradient reaches the boxes."""
    with torch.no_grad():
        iou_final = paired_iou(final.detach().float(), target.float())
        better = improved(paired_iou(coarse.float(), target.float()), iou_final).float()
    labels = torch.stack([iou_final, better], dim=1).to(score_logits.device)
    return F.binary_cross_entropy_with_logits(score_logits.float(), labels)
