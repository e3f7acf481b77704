"""The least a refiner can be, to show that a variant is its module and one registry line: one learnt offset
per side, in pixels, added to every box, and a score that reads only the box's size."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pipeline.model.base import Refinement, Refiner, RefinerConfig
from pipeline.model.score import BoxScore
from pipeline.shapes import IMAGE_SIZE


class OffsetRefiner(Refiner):
    def __init__(self, config: RefinerConfig) -> None:
        super().__init__()
        self.config = config
        self.offset = nn.Parameter(torch.zeros(4))
        self.score = BoxScore(2)

    def forward_stages(
        self, embedding: Tensor, early: Tensor, boxes: list[Tensor], plane: Tensor | None = None
    ) -> Refinement:
        coarse = torch.cat(boxes).float()
        refined = coarse + self.offset * embedding.new_ones(())  # on the features' device and dtype
        evidence = ((coarse[:, 2:] - coarse[:, :2]).clamp_min(1.0) / IMAGE_SIZE).log()
        return Refinement([refined], evidence, self.score(evidence), torch.zeros_like(coarse))
