"""`train`: fit the box refiner on stored features; reads only the store and the box annotations.

In the style of torchvision's reference scripts: `prepare_training` builds the data, model, optimiser and
mixed precision of a run (or resumes them from a checkpoint), `run_epoch` runs the plain functions of
`pipeline.engine` on them, and `run_train` adds checkpoints (`pipeline.checkpoints`) and logging.

Reproducibility: every random draw is keyed by what it is for (the seed plus the epoch and image id, see
`pipeline.boxes.noise_generator`), never by draw order, so a run resumed from its checkpoint after
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
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from pipeline import distributed
from pipeline.abstention import choose_min_score, fit_calibration, written_iou
from pipeline.boxes import HOLDOUT_STREAM, seeded_generator
from pipeline.checkpoints import CHECKPOINT, check_resume, checkpoint_payload, load_checkpoint, save_checkpoint
from pipeline.config import TrainConfig
from pipeline.devices import resolve_amp, resolve_device
from pipeline.engine import (
    BoxOutcomes,
    CoarseBoxes,
    OnProgress,
    Precision,
    TrainForward,
    predict_outcomes,
    train_one_epoch,
)
from pipeline.errors import RefineError
from pipeline.features import (
    FeatureDataset,
    ImageBoxes,
    Split,
    feature_loader,
    feature_statistics,
    load_split,
    require_planes,
    resolve_namespace,
)
from pipeline.jsonio import write_json
from pipeline.metrics import improved, iou_summary
from pipeline.refiner import RefinerConfig, SimilarityCascadeRefiner, build_refiner
from pipeline.sampler import EpochShuffle
from pipeline.score import BoxScore, fit_score
from pipeline.store import FeatureStore

METRICS = "train_metrics.json"
LIVE_DIR = "live"
# Noisy copies of each held-out box in the last epoch, whose score and threshold are the ones shipped (the
# threshold rests on a few percent of the boxes; on the demo the score fitted on 4 copies, as in the other
# epochs, ranked val boxes at AUROC 0.84, on 16 at 0.86; the pass costs about a fifth of an epoch).
FINAL_HOLDOUT_COPIES = 16
# Validation values logged per epoch as DVC curves (the rest of the summary is in train_metrics.json).
VAL_CURVES = ("mean_iou_coarse", "mean_iou_refined", "share_improved", "share_worse")


@dataclass
class TrainSummary:
    out: Path
    fingerprint: str
    train: Split
    val: Split
    held_out: int = 0  # training images held out to choose the abstention threshold on
    epochs_run: int = 0
    start_epoch: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    wall_s: float = 0.0
    amp: str = "off"
    device: str = "cpu"


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


def hold_out(images: list[ImageBoxes], share: float, seed: int) -> tuple[list[ImageBoxes], list[ImageBoxes]]:
    """(images to train on, images held out to choose the abstention threshold on): `share` of them, at
    least one when share > 0, picked by a draw keyed by (seed, image id), so the order of the file does not matter."""
    if share <= 0:
        return images, []
    if len(images) < 2:
        raise RefineError(f"--holdout {share} needs at least 2 training images with boxes, got {len(images)}")
    draws = [torch.rand(1, generator=seeded_generator(seed, HOLDOUT_STREAM, image.image_id)).item() for image in images]
    count = min(len(images) - 1, max(1, round(share * len(images))))
    held = set(sorted(range(len(images)), key=draws.__getitem__)[:count])
    return [im for i, im in enumerate(images) if i not in held], [im for i, im in enumerate(images) if i in held]


@dataclass
class Training:
    """What a run trains with, built from its TrainConfig by `prepare_training`."""

    config: TrainConfig
    precision: Precision
    fingerprint: str
    encoder: dict[str, Any]  # model type and early channels, for the checkpoint
    train_split: Split
    val_split: Split
    train_boxes: CoarseBoxes
    val_boxes: CoarseBoxes  # of this rank's part of the validation images
    holdout_boxes: CoarseBoxes  # of this rank's part of the held-out training images
    held_out: int  # training images held out (over all ranks)
    model: SimilarityCascadeRefiner
    step_model: torch.nn.Module  # returns every cascade stage's boxes (DDP-wrapped under torchrun)
    refiner_config: RefinerConfig
    optimizer: torch.optim.Optimizer
    sampler: EpochShuffle
    train_loader: DataLoader
    val_loader: DataLoader
    holdout_loader: DataLoader
    learning_rate: Callable[[int], float]
    start_epoch: int
    checkpoint: dict[str, Any] | None  # the one resumed from


def prepare_training(
    config: TrainConfig, wrap_train_data: Callable[[FeatureDataset], FeatureDataset] | None = None
) -> Training:
    """Read the store's datasets, build (or resume) the refiner, its optimizer and its data loaders.

    `wrap_train_data` replaces the training loader's dataset by one with the same items made another way
    (bench/train.py: the encoder in the loop); the feature statistics still come from the store.
    """
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
    if not 0.0 <= config.holdout < 1.0:
        raise RefineError(f"--holdout must lie in [0, 1), got {config.holdout}")
    trained_images, held_images = hold_out(train_split.images, config.holdout, config.seed)

    torch.manual_seed(config.seed)
    refiner_config = config.refiner_config(int(provenance["early_channels"]))
    model = build_refiner(config.model, refiner_config)
    rank, world_size, main = distributed.rank(), distributed.world_size(), distributed.is_main()
    planes = model.needs_plane
    if planes:
        require_planes(store.url, [train_split, val_split])
    train_data = FeatureDataset(store.url, namespace.fingerprint, trained_images, planes)
    val_images = val_split.images[rank::world_size]  # under torchrun: each rank validates its part
    val_data = FeatureDataset(store.url, namespace.fingerprint, val_images, planes)
    held_part = held_images[rank::world_size]
    holdout_data = FeatureDataset(store.url, namespace.fingerprint, held_part, planes)
    checkpoint_path = config.out / CHECKPOINT
    # The main rank reads the checkpoint and hands it over: the other ranks' machines need no copy of <out>.
    checkpoint = distributed.broadcast(load_checkpoint(checkpoint_path) if main else None) if config.resume else None
    if checkpoint is not None:
        check_resume(checkpoint, config.resolved(), namespace.fingerprint, checkpoint_path)
        model.load_state_dict(checkpoint["model"])
    else:
        model.set_feature_statistics(distributed.broadcast(feature_statistics(train_data) if main else None))
    model.to(device)  # before the optimizer: its state is created (or loaded) on the parameters' device
    step_model: torch.nn.Module = TrainForward(model)
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
    loaded = wrap_train_data(train_data) if wrap_train_data is not None else train_data
    train_loader = feature_loader(loaded, rank_batch, workers, sampler, pin=device.type == "cuda")
    val_loader = feature_loader(val_data, rank_batch, workers, pin=device.type == "cuda")
    holdout_loader = feature_loader(holdout_data, rank_batch, workers, pin=device.type == "cuda")
    return Training(
        config=config,
        precision=Precision(device, amp_dtype, scaler),
        fingerprint=namespace.fingerprint,
        encoder={"model_type": provenance["model_type"], "early_channels": refiner_config.early_channels},
        train_split=train_split,
        val_split=val_split,
        train_boxes=CoarseBoxes(trained_images, config.noise, config.seed, config.jitters),
        val_boxes=CoarseBoxes(val_images, config.noise, config.seed),
        holdout_boxes=CoarseBoxes(held_part, config.noise, config.seed, config.jitters),
        held_out=len(held_images),
        model=model,
        step_model=step_model,
        refiner_config=refiner_config,
        optimizer=optimizer,
        sampler=sampler,
        train_loader=train_loader,
        val_loader=val_loader,
        holdout_loader=holdout_loader,
        learning_rate=cosine_schedule(config.lr, config.warmup_steps, config.epochs * len(train_loader)),
        start_epoch=checkpoint["epoch"] if checkpoint is not None else 0,
        checkpoint=checkpoint,
    )


def train_epoch(training: Training, epoch: int, progress: OnProgress | None = None) -> float:
    """Train one epoch (0-based) as `refine train` does: the epoch's shuffle, then `train_one_epoch`."""
    training.sampler.set_epoch(epoch)
    return train_one_epoch(
        training.step_model,
        training.optimizer,
        training.train_loader,
        training.train_boxes,
        training.precision,
        training.learning_rate,
        epoch,
        training.config.epochs,
        progress,
    )


def fit_abstention(score: BoxScore, held: BoxOutcomes, max_worse: float) -> dict[str, Any]:
    """Fit `score` on the held-out boxes and choose its threshold: `choose_min_score`'s figures, with the
    calibration and the ridge chosen. The out-of-fold logits, as new images would get them, are calibrated
    and choose the threshold, among the scores computed exactly as `apply` will."""
    better = improved(held.iou_coarse, held.iou_refined)
    fit = fit_score(held.evidence, better, held.image_id)
    calibration = fit_calibration(fit.out_of_fold, better)
    score.install(fit, calibration)
    held_score = score.probability(fit.out_of_fold.to(score.calibration.device)).cpu()
    return {
        **choose_min_score(held.iou_coarse, held.iou_refined, held_score, max_worse, held.image_id),
        "calibration": {"scale": float(calibration[0]), "bias": float(calibration[1])},
        "ridge": fit.ridge,
    }


def run_epoch(training: Training, epoch: int, progress: OnProgress | None = None) -> dict[str, Any]:
    """Train one epoch (0-based), choose the abstention threshold on the held-out images, then validate:
    {epoch (1-based), train_loss, abstention (`choose_min_score`), val (`iou_summary`, every box refined,
    with "abstained": the same with the threshold)}."""
    loss = train_epoch(training, epoch, progress)
    config = training.config

    def outcomes(loader: DataLoader, boxes: CoarseBoxes, phase: str) -> Any:
        # The bare refiner: DDP's forward expects every rank to take the same number of steps.
        return predict_outcomes(
            training.model, loader, boxes, training.precision, epoch, config.epochs, progress, phase
        )

    last = epoch + 1 == config.epochs
    held_boxes = replace(training.holdout_boxes, copies=FINAL_HOLDOUT_COPIES) if last else training.holdout_boxes
    held = outcomes(training.holdout_loader, held_boxes, "hold-out")
    abstention = fit_abstention(training.model.score, held, config.max_worse)
    val = outcomes(training.val_loader, training.val_boxes, "val")
    written = written_iou(val.iou_coarse, val.iou_refined, val.score, abstention["min_score"])
    summary = {**iou_summary(val.iou_coarse, val.iou_refined), "abstained": iou_summary(val.iou_coarse, written)}
    return {"epoch": epoch + 1, "train_loss": loss, "abstention": abstention, "val": summary}


def run_train(config: TrainConfig, progress: OnProgress | None = None) -> TrainSummary:
    """Train (or resume) a refiner; writes `<out>/model.pt`, `<out>/live/` and `<out>/train_metrics.json`."""
    started = time.perf_counter()
    training = prepare_training(config)
    precision = training.precision
    main = distributed.is_main()
    if main:
        config.out.mkdir(parents=True, exist_ok=True)
    summary = TrainSummary(
        config.out,
        training.fingerprint,
        training.train_split,
        training.val_split,
        start_epoch=training.start_epoch,
        held_out=training.held_out,
        amp=str(precision.amp_dtype).removeprefix("torch.") if precision.amp_dtype else "off",
        device=str(precision.device),
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
                    live.log_metric(f"val_abstained/{name}", metrics["val"]["abstained"][name])
            live.log_metric("abstention/min_score", metrics["abstention"]["min_score"])
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
        scaler=training.precision.scaler,
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
