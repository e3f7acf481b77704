"""`train`: fit the box refiner on stored features; reads only the store and the box annotations.

In the style of torchvision's reference scripts: `train_one_epoch` and `evaluate` are plain functions and
`run_train` wires data, model, optimiser, mixed precision, checkpoints and logging around them.

Reproducibility: every random draw is keyed by what it is for (the seed plus the epoch and image id, see
`pipeline.features.noise_generator`), never by draw order, so a run resumed from its checkpoint after
epoch k makes exactly the same draws as an uninterrupted run, whatever the number of workers.

Under torchrun: DistributedDataParallel. `--batch-size` stays the images of one step over all ranks
(each takes its part), so the noise draws are those of one process and the steps and schedule too (up
to the padding that gives every rank the same number of steps); each rank
reads its share of every epoch's permutation from the store, validation is split across the ranks and
gathered, and only the main rank writes the checkpoint, the curves and the metrics.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torchvision.ops import generalized_box_iou_loss

from pipeline import distributed
from pipeline.checkpoints import CHECKPOINT, check_resume, checkpoint_payload, load_checkpoint, save_checkpoint
from pipeline.boxes import valid_boxes
from pipeline.config import TrainConfig
from pipeline.devices import autocast, resolve_amp, resolve_device
from pipeline.errors import RefineError
from pipeline.features import (
    EpochShuffle,
    FeatureBatch,
    FeatureDataset,
    ImageBoxes,
    Split,
    coarse_and_targets,
    feature_loader,
    feature_statistics,
    load_split,
    resolve_namespace,
)
from pipeline.jsonio import write_json
from pipeline.metrics import iou_summary, paired_iou
from pipeline.refiner import RefinerConfig, SimilarityCascadeRefiner, build_refiner
from pipeline.shapes import IMAGE_SIZE
from pipeline.store import FeatureStore

METRICS = "train_metrics.json"
LIVE_DIR = "live"
# Validation values logged per epoch as DVC curves (the rest of the summary is in train_metrics.json).
VAL_CURVES = ("mean_iou_coarse", "mean_iou_refined", "share_improved", "share_worse")


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


@dataclass
class TrainSummary:
    out: Path
    fingerprint: str
    train: Split
    val: Split
    epochs_run: int = 0
    start_epoch: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    wall_s: float = 0.0
    amp: str = "off"
    device: str = "cpu"


Progress = Callable[[TrainProgress], None]


# -- loss and metrics --------------------------------------------------------------------------------
def box_loss(stages: list[Tensor], coarse: Tensor, target: Tensor) -> Tensor:
    """L1 + GIoU, averaged over cascade stages; coordinates normalised, never raw pixels.

    stages: per stage K x 4 predicted boxes; coarse, target: K x 4 (encoder-input pixels).
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


# -- one epoch, evaluation ---------------------------------------------------------------------------
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


def _boxes_of(
    images: list[ImageBoxes], batch: FeatureBatch, config: TrainConfig, epoch: int | None, copies: int
) -> tuple[list[Tensor], list[Tensor]]:
    """Coarse boxes per image of a batch and their targets (lists of N_i x 4)."""
    pairs = [coarse_and_targets(images[i], config.noise, config.seed, epoch, copies) for i in batch.indices]
    return [coarse for coarse, _ in pairs], [targets for _, targets in pairs]


class CascadeStages(torch.nn.Module):
    """The refiner's training forward (every cascade stage's boxes) as `forward`: DistributedDataParallel
    synchronises gradients only for what runs through the wrapped module's `forward`."""

    def __init__(self, refiner: SimilarityCascadeRefiner) -> None:
        super().__init__()
        self.refiner = refiner

    def forward(self, embedding: Tensor, early: Tensor, boxes: list[Tensor]) -> list[Tensor]:
        return self.refiner.forward_stages(embedding, early, boxes)


def train_one_epoch(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    loader: DataLoader,
    images: list[ImageBoxes],
    config: TrainConfig,
    epoch: int,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    learning_rate: Callable[[int], float],
    progress: Progress | None = None,
) -> float:
    """One pass over the training images; returns the mean loss. `epoch` is 0-based.

    `model` returns every cascade stage's boxes: a `CascadeStages`, or one wrapped in DistributedDataParallel.
    """
    model.train()
    steps = len(loader)
    timer = _Timer()
    losses: list[float] = []
    for step, batch in enumerate(_batches(loader, timer)):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(epoch * steps + step)
        coarse, per_image = _boxes_of(images, batch, config, epoch, config.jitters)
        coarse = [boxes.to(device) for boxes in coarse]
        targets = torch.cat(per_image).to(device)
        with autocast(device, amp_dtype):
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
                    "train", epoch + 1, config.epochs, step + 1, steps, sum(losses) / len(losses), boxes_per_s, waiting
                )
            )
    return sum(losses) / max(len(losses), 1)


@torch.inference_mode()
def evaluate(
    model: SimilarityCascadeRefiner,
    loader: DataLoader,
    images: list[ImageBoxes],
    config: TrainConfig,
    epoch: int,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Mean IoU of coarse and refined boxes against the ground truth on the validation images.

    Coarse boxes come from the validation results file, or from the noise protocol with a fixed draw per
    image (the same every epoch and every run of the same seed), so epochs are comparable.
    """
    model.eval()
    steps = len(loader)
    timer = _Timer()
    coarse_iou, refined_iou = [], []
    for step, batch in enumerate(_batches(loader, timer)):
        coarse, targets = _boxes_of(images, batch, config, None, 1)
        with autocast(device, amp_dtype):
            refined = model(batch.embedding.to(device), batch.early.to(device), [c.to(device) for c in coarse])
        for index, before, after, target in zip(batch.indices, coarse, refined, targets, strict=True):
            # The boxes `apply` would write (clipped to the image), so these figures match `refine evaluate`.
            final = valid_boxes(after.float().cpu(), before, images[index].resized_hw)
            coarse_iou.append(paired_iou(before, target))
            refined_iou.append(paired_iou(final, target))
            timer.boxes += len(target)
        if progress:
            boxes_per_s, waiting = timer.rates()
            progress(TrainProgress("val", epoch + 1, config.epochs, step + 1, steps, math.nan, boxes_per_s, waiting))
    # Under torchrun each rank evaluated its part of the images: every rank gets all the IoUs.
    parts = distributed.all_gather(
        (torch.cat(coarse_iou or [torch.empty(0)]), torch.cat(refined_iou or [torch.empty(0)]))
    )
    return iou_summary(torch.cat([part[0] for part in parts]), torch.cat([part[1] for part in parts]))


# -- the whole run -----------------------------------------------------------------------------------
def cosine_schedule(base_lr: float, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to zero; a pure function of the step, so resuming needs no state."""

    def learning_rate(step: int) -> float:
        warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
        return base_lr * warm * 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))

    return learning_rate


def _workers(config: TrainConfig, device: torch.device) -> int:
    if config.workers is not None:
        return config.workers
    return 2 if device.type == "cuda" else 0


@dataclass
class Training:
    """What a run trains with, built from its TrainConfig by `prepare_training`."""

    config: TrainConfig
    device: torch.device
    amp_dtype: torch.dtype | None
    fingerprint: str
    encoder: dict[str, Any]  # model type and early channels, for the checkpoint
    train_split: Split
    val_split: Split
    val_images: list[ImageBoxes]  # this rank's part of the validation images
    model: SimilarityCascadeRefiner
    step_model: torch.nn.Module  # returns every cascade stage's boxes (DDP-wrapped under torchrun)
    refiner_config: RefinerConfig
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    sampler: EpochShuffle
    train_loader: DataLoader
    val_loader: DataLoader
    learning_rate: Callable[[int], float]
    start_epoch: int
    checkpoint: dict[str, Any] | None  # the one resumed from


def prepare_training(config: TrainConfig) -> Training:
    """Read the store's datasets, build (or resume) the refiner, its optimizer and its data loaders."""
    if not 0.0 <= config.noise <= 0.5:
        raise RefineError(f"--noise must lie in [0, 0.5], got {config.noise}")
    device = resolve_device(config.device)
    amp_dtype = resolve_amp(config.amp, device)
    store = FeatureStore(config.store)
    dataset = config.dataset or config.annotations.stem
    namespace = resolve_namespace(store, dataset, config.fingerprint)
    train_split = load_split(namespace, dataset, config.annotations, config.coarse)
    val_annotations = config.val_annotations or config.annotations
    val_dataset = config.val_dataset or (val_annotations.stem if config.val_annotations else dataset)
    val_split = load_split(namespace, val_dataset, val_annotations, config.val_coarse)
    provenance = namespace.provenance

    torch.manual_seed(config.seed)
    refiner_config = config.refiner_config(int(provenance["early_channels"]))
    model = build_refiner(config.model, refiner_config)
    rank, world_size, main = distributed.rank(), distributed.world_size(), distributed.is_main()
    train_data = FeatureDataset(store.url, namespace.fingerprint, train_split.images)
    val_images = val_split.images[rank::world_size]  # under torchrun: each rank validates its part
    val_data = FeatureDataset(store.url, namespace.fingerprint, val_images)
    checkpoint_path = config.out / CHECKPOINT
    # The main rank reads the checkpoint and hands it over: the other ranks' machines need no copy of <out>.
    checkpoint = distributed.broadcast(load_checkpoint(checkpoint_path) if main else None) if config.resume else None
    if checkpoint is not None:
        check_resume(checkpoint, config.resolved(), namespace.fingerprint, checkpoint_path)
        model.load_state_dict(checkpoint["model"])
    else:
        model.set_feature_statistics(distributed.broadcast(feature_statistics(train_data) if main else None))
    model.to(device)  # before the optimizer: its state is created (or loaded) on the parameters' device
    step_model: torch.nn.Module = CascadeStages(model)
    if world_size > 1:
        # The refiner's buffers are fixed feature statistics: synced once when wrapped, never again per step.
        step_model = DistributedDataParallel(
            step_model, device_ids=[device.index] if device.type == "cuda" else None, forward_sync_buffers=False
        )
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
        if checkpoint["scaler"] is not None:
            scaler.load_state_dict(checkpoint["scaler"])

    workers = _workers(config, device)
    sampler = EpochShuffle(len(train_data), config.seed, rank, world_size)
    rank_batch = math.ceil(config.batch_size / world_size)  # --batch-size is one step over all ranks
    train_loader = feature_loader(train_data, rank_batch, workers, sampler, pin=device.type == "cuda")
    val_loader = feature_loader(val_data, rank_batch, workers, pin=device.type == "cuda")
    return Training(
        config=config,
        device=device,
        amp_dtype=amp_dtype,
        fingerprint=namespace.fingerprint,
        encoder={"model_type": provenance["model_type"], "early_channels": refiner_config.early_channels},
        train_split=train_split,
        val_split=val_split,
        val_images=val_images,
        model=model,
        step_model=step_model,
        refiner_config=refiner_config,
        optimizer=optimizer,
        scaler=scaler,
        sampler=sampler,
        train_loader=train_loader,
        val_loader=val_loader,
        learning_rate=cosine_schedule(config.lr, config.warmup_steps, config.epochs * len(train_loader)),
        start_epoch=checkpoint["epoch"] if checkpoint is not None else 0,
        checkpoint=checkpoint,
    )


def run_epoch(training: Training, epoch: int, progress: Progress | None = None) -> dict[str, Any]:
    """Train one epoch (0-based), then validate: {epoch (1-based), train_loss, val}."""
    t = training
    t.sampler.set_epoch(epoch)
    loss = train_one_epoch(
        t.step_model,
        t.optimizer,
        t.scaler,
        t.train_loader,
        t.train_split.images,
        t.config,
        epoch,
        t.device,
        t.amp_dtype,
        t.learning_rate,
        progress,
    )
    # The bare refiner: DDP's forward expects every rank to take the same number of steps.
    val = evaluate(t.model, t.val_loader, t.val_images, t.config, epoch, t.device, t.amp_dtype, progress)
    return {"epoch": epoch + 1, "train_loss": loss, "val": val}


def run_train(config: TrainConfig, progress: Progress | None = None) -> TrainSummary:
    """Train (or resume) a refiner; writes `<out>/model.pt`, `<out>/live/` and `<out>/train_metrics.json`."""
    started = time.perf_counter()
    training = prepare_training(config)
    main = distributed.is_main()
    if main:
        config.out.mkdir(parents=True, exist_ok=True)
    summary = TrainSummary(
        config.out,
        training.fingerprint,
        training.train_split,
        training.val_split,
        start_epoch=training.start_epoch,
        amp=str(training.amp_dtype).removeprefix("torch.") if training.amp_dtype else "off",
        device=str(training.device),
    )
    metrics: dict[str, Any] = {}
    with _live(config.out / LIVE_DIR, resume=config.resume, enabled=main) as live:
        for epoch in range(training.start_epoch, config.epochs):
            metrics = run_epoch(training, epoch, progress)
            summary.epochs_run += 1
            if not main:
                continue
            live.log_metric("train/loss", metrics["train_loss"])
            for name in VAL_CURVES:
                if metrics["val"][name] is not None:  # None: no validation boxes
                    live.log_metric(f"val/{name}", metrics["val"][name])
            live.next_step()
            save_checkpoint(config.out / CHECKPOINT, _checkpoint(training, metrics))
    if training.checkpoint is not None and not metrics:  # resumed a finished run: report what it reached
        metrics = training.checkpoint["metrics"]
    summary.metrics = metrics
    if main:
        write_json(config.out / METRICS, metrics, sort_keys=True)
    summary.wall_s = time.perf_counter() - started
    return summary


def _checkpoint(training: Training, metrics: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint after the epoch `metrics` reports."""
    return checkpoint_payload(
        model=training.model,
        optimizer=training.optimizer,
        scaler=training.scaler,
        epoch=metrics["epoch"],
        config=training.config.resolved(),
        refiner_name=training.config.model,
        refiner_config=training.refiner_config,
        fingerprint=training.fingerprint,
        encoder=training.encoder,
        metrics=metrics,
    )


def _live(directory: Path, resume: bool, enabled: bool) -> Any:
    """dvclive logging into `directory`; DVC plots are declared in the project's own dvc.yaml.

    Disabled (the other ranks under torchrun): a context that logs nothing and is never called.
    """
    if not enabled:
        return contextlib.nullcontext()
    from dvclive import Live  # imported late: dvclive pulls in much of DVC

    return Live(dir=str(directory), resume=resume, dvcyaml=None, save_dvc_exp=False, report=None)
