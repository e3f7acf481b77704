"""The refiner's training loss: L1 + GIoU on normalised coordinates, never raw pixels.

The score is not trained with it: `train` fits it on held-out images (`pipeline.model.score`)."""

from __future__ import annotations

from torch import Tensor
from torchvision.ops import generalized_box_iou_loss

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
