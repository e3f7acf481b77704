"""One training epoch and one validation pass, as plain functions (in the spirit of torchvision's
references/detection/engine.py); `pipeline.training.train` builds what they take and runs them epoch after epoch.

Both iterate a `feature_loader` of whole images and take every box of an image from one read of its
features; the coarse boxes of each image come from `CoarseBoxes` (its results file or the noise protocol).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from pipeline import distributed
from pipeline.boxes import valid_boxes
from pipeline.devices import autocast
from pipeline.errors import RefineError
from pipeline.splits import ImageBoxes, coarse_and_targets
from pipeline.training.data import FeatureBatch
from pipeline.training.loss import box_loss
from pipeline.metrics import paired_iou
from pipeline.model.base import Refinement, Refiner


@dataclass
class TrainProgress:
    """What the training loop reports after each step (train) or batch (val)."""

    phase: str  # "train", "val" or "hold-out" (the images the abstention threshold is chosen on)
    epoch: int  # 1-based
    epochs: int
    step: int
    steps: int
    loss: float  # running mean of the epoch's training loss (nan during val)
    boxes_per_s: float
    data_wait_share: float  # share of the phase's wall time spent waiting for the DataLoader


OnProgress = Callable[[TrainProgress], None]


@dataclass(frozen=True)
class Precision:
    """Where and how a step computes: the device, the autocast dtype (None: fp32) and the loss scaler
    (enabled for fp16 only)."""

    device: torch.device
    amp_dtype: torch.dtype | None
    scaler: torch.amp.GradScaler


@dataclass(frozen=True)
class CoarseBoxes:
    """The coarse boxes of a split's images and the ground truth each should become.

    From the split's results file when it has one; otherwise the noise protocol with `noise` and `seed`:
    `copies` noisy versions of every ground-truth box, drawn for (seed, epoch, image) in training, and in
    validation (epoch None) from a fixed draw per image, the same every epoch and every run of the seed.
    """

    images: list[ImageBoxes]
    noise: float
    seed: int
    copies: int = 1

    def of(self, indices: list[int], epoch: int | None) -> tuple[list[Tensor], list[Tensor]]:
        """Coarse boxes and targets of the images at `indices` (lists of N_i x 4, encoder-input pixels)."""
        pairs = [coarse_and_targets(self.images[i], self.noise, self.seed, epoch, self.copies) for i in indices]
        return [coarse for coarse, _ in pairs], [targets for _, targets in pairs]


class TrainForward(torch.nn.Module):
    """The refiner's training forward (every cascade stage's boxes) as `forward`: DistributedDataParallel
    synchronises gradients only for what runs through the wrapped module's `forward`."""

    def __init__(self, refiner: Refiner) -> None:
        super().__init__()
        self.refiner = refiner

    def forward(self, embedding: Tensor, early: Tensor, boxes: list[Tensor], plane: Tensor | None = None) -> Refinement:
        """embedding: B x 256 x 64 x 64, early: B x C x 64 x 64, boxes: B lists of N_i x 4, plane: None or
        B x 3 x 256 x 256 -> per stage sum(N_i) x 4 boxes, and the score logits."""
        return self.refiner.forward_stages(embedding, early, boxes, plane)


@dataclass
class _Timer:
    """Wall time of a phase and how much of it went to waiting for data."""

    started: float = field(default_factory=time.perf_counter)
    waiting: float = 0.0
    boxes: int = 0

    def rates(self) -> tuple[float, float]:
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        return self.boxes / elapsed, self.waiting / elapsed


def _batches(loader: DataLoader, timer: _Timer) -> Iterator[FeatureBatch]:
    """Iterate a loader, adding the time spent blocked on it to `timer.waiting`; stop on a damaged entry."""
    iterator = iter(loader)
    while True:
        waiting = time.perf_counter()
        try:
            batch = next(iterator)
        except StopIteration:
            return
        timer.waiting += time.perf_counter() - waiting
        if batch.errors:
            raise RefineError(batch.errors[0])
        yield batch


def _plane(batch: FeatureBatch, device: torch.device) -> Tensor | None:
    return batch.plane.to(device, non_blocking=True) if batch.plane is not None else None


def train_one_epoch(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    boxes: CoarseBoxes,
    precision: Precision,
    learning_rate: Callable[[int], float],
    epoch: int,
    epochs: int,
    progress: OnProgress | None = None,
) -> float:
    """One pass over the training images; returns the mean loss. `epoch` is 0-based, of `epochs`.

    `model` returns every cascade stage's boxes: a `TrainForward`, or one wrapped in DistributedDataParallel.
    `learning_rate` maps the global step to the step's learning rate.
    """
    model.train()
    device, scaler = precision.device, precision.scaler
    steps = len(loader)
    timer = _Timer()
    losses: list[float] = []
    for step, batch in enumerate(_batches(loader, timer)):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(epoch * steps + step)
        coarse, per_image = boxes.of(batch.indices, epoch)
        coarse = [b.to(device) for b in coarse]
        targets = torch.cat(per_image).to(device)
        with autocast(device, precision.amp_dtype):
            refinement = model(
                batch.embedding.to(device, non_blocking=True),
                batch.early.to(device, non_blocking=True),
                coarse,
                _plane(batch, device),
            )
        stages = [s.float() for s in refinement.stages]
        loss = box_loss(stages, torch.cat(coarse), targets)
        value = distributed.mean(loss)  # over the ranks: a NaN on one stops every rank at the same step
        if not math.isfinite(value):
            raise RefineError(
                f"training loss is {value} at epoch {epoch + 1}, step {step + 1} of {steps}; training stopped "
                f"(lr {optimizer.param_groups[0]['lr']:.3g}). Lower --lr, or check the store with `refine store verify`"
            )
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(value)
        timer.boxes += len(targets)
        if progress:
            boxes_per_s, waiting = timer.rates()
            progress(
                TrainProgress(
                    "train", epoch + 1, epochs, step + 1, steps, sum(losses) / len(losses), boxes_per_s, waiting
                )
            )
    return sum(losses) / max(len(losses), 1)


@dataclass
class BoxOutcomes:
    """What the refiner did to each box of a split, against the ground truth (N each, all ranks' boxes)."""

    iou_coarse: Tensor
    iou_refined: Tensor  # of the refined box as `apply` would write it (clipped to the image)
    score: Tensor  # by the model's score at the time, as `apply` would see it
    evidence: Tensor  # N x F: what the score reads, which `train` fits the score on
    image_id: Tensor  # N: each box's image (the score's cross-fitting folds and bootstrap keep images whole)


@torch.inference_mode()
def predict_outcomes(
    model: Refiner,
    loader: DataLoader,
    boxes: CoarseBoxes,
    precision: Precision,
    epoch: int,
    epochs: int,
    progress: OnProgress | None = None,
    phase: str = "val",
) -> BoxOutcomes:
    """Refine and score the fixed coarse draw of `boxes` over every rank's part; `epoch` (0-based) of
    `epochs` and `phase` are for the progress only. The draw is the same every epoch, so epochs compare."""
    model.eval()
    device = precision.device
    steps = len(loader)
    timer = _Timer()
    coarse_iou, refined_iou, scores, evidence, image_ids = [], [], [], [], []
    for step, batch in enumerate(_batches(loader, timer)):
        coarse, targets = boxes.of(batch.indices, None)
        with autocast(device, precision.amp_dtype):
            refinement = model.forward_stages(
                batch.embedding.to(device),
                batch.early.to(device),
                [c.to(device) for c in coarse],
                _plane(batch, device),
            )
        counts = [len(c) for c in coarse]
        refined = refinement.stages[-1].split(counts)
        score = model.score.probability(refinement.score_logits).split(counts)
        for index, before, after, target, box_score, box_evidence in zip(
            batch.indices, coarse, refined, targets, score, refinement.evidence.split(counts), strict=True
        ):
            # The boxes `apply` would write (clipped to the image), so these figures match `refine evaluate`.
            final = valid_boxes(after.float().cpu(), before, boxes.images[index].resized_hw)
            coarse_iou.append(paired_iou(before, target))
            refined_iou.append(paired_iou(final, target))
            scores.append(box_score.float().cpu())
            evidence.append(box_evidence.float().cpu())
            image_ids.append(torch.full((len(target),), boxes.images[index].image_id, dtype=torch.int64))
            timer.boxes += len(target)
        if progress:
            boxes_per_s, waiting = timer.rates()
            progress(TrainProgress(phase, epoch + 1, epochs, step + 1, steps, math.nan, boxes_per_s, waiting))
    # Under torchrun each rank refined its part of the images: every rank gets all the outcomes.
    features = model.score.mean.numel()
    parts = distributed.all_gather(
        (
            *(torch.cat(values or [torch.empty(0)]) for values in (coarse_iou, refined_iou, scores)),
            torch.cat(evidence or [torch.empty(0, features)]),
            torch.cat(image_ids or [torch.empty(0, dtype=torch.int64)]),
        )
    )
    return BoxOutcomes(*(torch.cat([part[i] for part in parts]) for i in range(5)))
