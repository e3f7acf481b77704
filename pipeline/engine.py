"""One training epoch and one validation pass, as plain functions (in the spirit of torchvision's
references/detection/engine.py); `pipeline.train` builds what they take and runs them epoch after epoch.

Both iterate a `feature_loader` of whole images and take every box of an image from one read of its
features; the coarse boxes of each image come from `CoarseBoxes` (its results file or the noise protocol).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from pipeline import distributed
from pipeline.boxes import valid_boxes
from pipeline.devices import autocast
from pipeline.errors import RefineError
from pipeline.features import FeatureBatch, ImageBoxes, coarse_and_targets
from pipeline.loss import box_loss
from pipeline.metrics import iou_summary, paired_iou
from pipeline.refiner import SimilarityCascadeRefiner


@dataclass
class TrainProgress:
    """What the training loop reports after each step (train) or batch (val)."""

    phase: str  # "train" or "val"
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
    in training `copies` noisy versions of every ground-truth box, drawn for (seed, epoch, image); in
    validation (epoch None) one fixed draw per image, the same every epoch and every run of the seed.
    """

    images: list[ImageBoxes]
    noise: float
    seed: int
    copies: int = 1

    def of(self, indices: list[int], epoch: int | None) -> tuple[list[Tensor], list[Tensor]]:
        """Coarse boxes and targets of the images at `indices` (lists of N_i x 4, encoder-input pixels)."""
        copies = self.copies if epoch is not None else 1
        pairs = [coarse_and_targets(self.images[i], self.noise, self.seed, epoch, copies) for i in indices]
        return [coarse for coarse, _ in pairs], [targets for _, targets in pairs]


class TrainForward(torch.nn.Module):
    """The refiner's training forward (every cascade stage's boxes) as `forward`: DistributedDataParallel
    synchronises gradients only for what runs through the wrapped module's `forward`."""

    def __init__(self, refiner: SimilarityCascadeRefiner) -> None:
        super().__init__()
        self.refiner = refiner

    def forward(self, embedding: Tensor, early: Tensor, boxes: list[Tensor]) -> list[Tensor]:
        """embedding: B x 256 x 64 x 64, early: B x C x 64 x 64, boxes: B lists of N_i x 4 -> per stage
        sum(N_i) x 4 boxes."""
        return self.refiner.forward_stages(embedding, early, boxes)


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
            stages = model(
                batch.embedding.to(device, non_blocking=True), batch.early.to(device, non_blocking=True), coarse
            )
        loss = box_loss([s.float() for s in stages], torch.cat(coarse), targets)
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


@torch.inference_mode()
def validate(
    model: SimilarityCascadeRefiner,
    loader: DataLoader,
    boxes: CoarseBoxes,
    precision: Precision,
    epoch: int,
    epochs: int,
    progress: OnProgress | None = None,
) -> dict[str, Any]:
    """Mean IoU of coarse and refined boxes against the ground truth on the validation images
    (`iou_summary`'s keys), over every rank's part; `epoch` (0-based) of `epochs` is for the progress only.

    The coarse boxes are the fixed validation draw of `boxes`, so epochs are comparable.
    """
    model.eval()
    device = precision.device
    steps = len(loader)
    timer = _Timer()
    coarse_iou, refined_iou = [], []
    for step, batch in enumerate(_batches(loader, timer)):
        coarse, targets = boxes.of(batch.indices, None)
        with autocast(device, precision.amp_dtype):
            refined = model(batch.embedding.to(device), batch.early.to(device), [c.to(device) for c in coarse])
        for index, before, after, target in zip(batch.indices, coarse, refined, targets, strict=True):
            # The boxes `apply` would write (clipped to the image), so these figures match `refine evaluate`.
            final = valid_boxes(after.float().cpu(), before, boxes.images[index].resized_hw)
            coarse_iou.append(paired_iou(before, target))
            refined_iou.append(paired_iou(final, target))
            timer.boxes += len(target)
        if progress:
            boxes_per_s, waiting = timer.rates()
            progress(TrainProgress("val", epoch + 1, epochs, step + 1, steps, math.nan, boxes_per_s, waiting))
    # Under torchrun each rank evaluated its part of the images: every rank gets all the IoUs.
    parts = distributed.all_gather(
        (torch.cat(coarse_iou or [torch.empty(0)]), torch.cat(refined_iou or [torch.empty(0)]))
    )
    return iou_summary(torch.cat([part[0] for part in parts]), torch.cat([part[1] for part in parts]))
