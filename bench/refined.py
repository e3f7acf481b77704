"""One image's boxes through a trained refiner as `apply` refines them, for the benches that probe the score."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from pipeline.boxes import valid_boxes
from pipeline.splits import ImageBoxes
from pipeline.model.base import Refinement, Refiner
from pipeline.store import Namespace


@dataclass(frozen=True)
class ImageInputs:
    """One entry's stored inputs, batched: 1 x 256 x 64 x 64 embedding, 1 x C x 64 x 64 early feature and,
    when the refiner reads it, the 1 x 3 x 256 x 256 stride-4 plane."""

    embedding: Tensor
    early: Tensor
    plane: Tensor | None

    def flipped(self) -> ImageInputs:
        """The same inputs mirrored left-right."""
        return ImageInputs(
            self.embedding.flip(-1), self.early.flip(-1), None if self.plane is None else self.plane.flip(-1)
        )


def read_image(model: Refiner, namespace: Namespace, image: ImageBoxes) -> ImageInputs:
    """The image's entry read (and checked) as the refiner needs it."""
    embedding, early, plane = namespace.read_inputs(image.entry, with_plane=model.needs_plane, check=True)
    return ImageInputs(
        torch.tensor(embedding[None], dtype=torch.float32),
        torch.tensor(early[None], dtype=torch.float32),
        None if plane is None else torch.tensor(plane[None]),
    )


def refine(model: Refiner, inputs: ImageInputs, boxes: Tensor) -> Refinement:
    """K x 4 xyxy boxes (1024 frame) of one image -> the refiner's stages, evidence and score logits."""
    return model.forward_stages(inputs.embedding, inputs.early, [boxes], inputs.plane)


def written(refinement: Refinement, coarse: Tensor, image: ImageBoxes) -> Tensor:
    """K x 4: the final boxes as `apply` writes them (clipped to the image; a degenerate box keeps the coarse)."""
    return valid_boxes(refinement.stages[-1], coarse, image.resized_hw)
