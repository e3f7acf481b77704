"""One image's boxes through a trained refiner as `apply` refines them, for the benches that probe the score."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from torch import Tensor

from pipeline.boxes import valid_boxes
from pipeline.inference.core import load_model
from pipeline.model.checkpoints import Checkpoint
from pipeline.splits import Split, load_split
from pipeline.store import FeatureStore
from pipeline.training.setup import hold_out
from pipeline.training.train import FINAL_HOLDOUT_COPIES
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


def score_bench_arguments(description: str, name: str) -> argparse.Namespace:
    """The options of the benches that refit a trained refiner's score: store, splits, model and output."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", required=True, help="feature store the model was trained on")
    parser.add_argument("--train-annotations", type=Path, required=True, help="the training split's COCO file")
    parser.add_argument("--annotations", type=Path, required=True, help="the val split's COCO file")
    parser.add_argument("--model", type=Path, required=True, help="trained refiner (model.pt)")
    parser.add_argument("--max-worse", type=float, default=0.03, help="share worse allowed (default 0.03)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="folder for the JSON")
    parser.add_argument("--name", default=name, help="name of the JSON file (without .json)")
    return parser.parse_args()


T = TypeVar("T")


@dataclass(frozen=True)
class TrainedRun:
    """A trained refiner with the images `train` held out for its score (its --holdout and seed) and the val split."""

    model: Refiner
    namespace: Namespace
    checkpoint: Checkpoint
    held_images: list[ImageBoxes]
    val: Split

    def on_held_out_and_val(self, measure: Callable[..., T]) -> tuple[T, T]:
        """`measure(model, namespace, images, noise, seed, copies)` on the held-out images with the coarse
        copies `train` scores them with, and on val with one."""
        noise, seed = self.checkpoint.noise, self.checkpoint.seed
        return (
            measure(self.model, self.namespace, self.held_images, noise, seed, FINAL_HOLDOUT_COPIES),
            measure(self.model, self.namespace, self.val.images, noise, seed, 1),
        )


def trained_run(args: argparse.Namespace) -> TrainedRun:
    """The run `score_bench_arguments` names."""
    model, namespace, checkpoint = load_model(args.model, FeatureStore(args.store))
    train = load_split(namespace, args.train_annotations.stem, args.train_annotations)
    _, held_images = hold_out(train.images, checkpoint.holdout, checkpoint.seed)
    val = load_split(namespace, args.annotations.stem, args.annotations)
    return TrainedRun(model, namespace, checkpoint, held_images, val)
