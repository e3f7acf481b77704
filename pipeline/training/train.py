"""`train`: fit the box refiner on stored features; reads only the store and the box annotations.

In the style of torchvision's reference scripts: `prepare_training` (`pipeline.training.setup`) builds the
data, model, optimiser and mixed precision of a run (or resumes them from a checkpoint), `train_and_validate`
runs the plain functions of `pipeline.training.engine` on them, and `run_train` adds checkpoints
(`pipeline.model.checkpoints`) and logging.

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
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from torch import Tensor
from torch.utils.data import DataLoader

from pipeline import distributed
from pipeline.errors import RefineError
from pipeline.model.abstention import choose_min_score, fit_calibration, written_iou
from pipeline.model.checkpoints import CHECKPOINT, Checkpoint
from pipeline.training.config import TrainConfig
from pipeline.training.setup import Training, prepare_training
from pipeline.training.engine import (
    BoxOutcomes,
    CoarseBoxes,
    OnProgress,
    predict_outcomes,
    train_one_epoch,
)
from pipeline.splits import Split
from pipeline.metrics import improved, iou_summary
from pipeline.model.score import BoxScore, fit_score
from pipeline.model.train_metrics import METRICS_FILE, AbstentionFit, TrainMetrics
from pipeline.figures import BoxFigures

LIVE_DIR = "live"
# Noisy copies of each held-out box in the last epoch, whose score and threshold are the ones shipped (the
# threshold rests on a few percent of the boxes; on the demo the score fitted on 4 copies, as in the other
# epochs, ranked val boxes at AUROC 0.84, on 16 at 0.86; the pass costs about a fifth of an epoch).
FINAL_HOLDOUT_COPIES = 16
# Validation values logged per epoch as DVC curves (the rest of the summary is in METRICS_FILE).
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
    metrics: TrainMetrics | None = None  # the last epoch's
    wall_s: float = 0.0
    amp: str = "off"
    device: str = "cpu"


def train_shuffled_epoch(training: Training, epoch: int, progress: OnProgress | None = None) -> float:
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


@dataclass(frozen=True)
class HeldOutScore:
    """The score fitted on the held-out boxes: their calibrated out-of-fold scores (N), as new images would
    get them, with the calibration (scale, bias) and the ridge chosen."""

    probability: Tensor
    calibration: tuple[float, float]
    ridge: float | None


def fit_held_out_score(score: BoxScore, held: BoxOutcomes) -> HeldOutScore:
    """Fit and install `score` on the held-out boxes (`fit_score`, `fit_calibration`)."""
    better = improved(held.iou_coarse, held.iou_refined)
    fit = fit_score(held.evidence, better, held.image_id)
    calibration = fit_calibration(fit.out_of_fold, better)
    score.install(fit, calibration)
    probability = score.probability(fit.out_of_fold.to(score.calibration.device)).cpu()
    return HeldOutScore(probability, (float(calibration[0]), float(calibration[1])), fit.ridge)


def fit_abstention(score: BoxScore, held: BoxOutcomes, max_worse: float) -> AbstentionFit:
    """Fit `score` on the held-out boxes and choose its threshold on their out-of-fold scores, computed
    exactly as `apply` will compute scores."""
    fitted = fit_held_out_score(score, held)
    chosen = choose_min_score(held.iou_coarse, held.iou_refined, fitted.probability, max_worse, held.image_id)
    scale, bias = fitted.calibration
    return AbstentionFit.from_json({**chosen, "calibration": {"scale": scale, "bias": bias}, "ridge": fitted.ridge})


def train_and_validate(training: Training, epoch: int, progress: OnProgress | None = None) -> TrainMetrics:
    """Train one epoch (0-based), choose the abstention threshold on the held-out images, then validate."""
    loss = train_shuffled_epoch(training, epoch, progress)
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
    written = written_iou(val.iou_coarse, val.iou_refined, val.score, abstention.min_score)
    return TrainMetrics(
        epoch=epoch + 1,
        train_loss=loss,
        abstention=abstention,
        val=BoxFigures.from_json(iou_summary(val.iou_coarse, val.iou_refined)),
        val_abstained=BoxFigures.from_json(iou_summary(val.iou_coarse, written)),
    )


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
    metrics: TrainMetrics | None = None
    with _live(config.out / LIVE_DIR, resume=config.resume, enabled=main) as live:
        for epoch in range(training.start_epoch, config.epochs):
            metrics = train_and_validate(training, epoch, progress)
            summary.epochs_run += 1
            if not main:
                continue
            live.log_metric("train/loss", metrics.train_loss)
            if metrics.val.count:
                for name in VAL_CURVES:
                    live.log_metric(f"val/{name}", getattr(metrics.val, name))
                    live.log_metric(f"val_abstained/{name}", getattr(metrics.val_abstained, name))
            live.log_metric("abstention/min_score", metrics.abstention.min_score)
            live.next_step()
            _checkpoint(training, metrics).save(config.out / CHECKPOINT)
    if metrics is None:  # no epoch ran: a finished run resumed reports what it reached
        if training.checkpoint is None:
            raise RefineError(f"epochs must be at least 1, got {config.epochs}")
        metrics = training.checkpoint.metrics
    summary.metrics = metrics
    if main:
        metrics.write(config.out / METRICS_FILE)
    summary.wall_s = time.perf_counter() - started
    return summary


def _checkpoint(training: Training, metrics: TrainMetrics) -> Checkpoint:
    """The checkpoint after the epoch `metrics` reports."""
    scaler = training.precision.scaler
    return Checkpoint(
        model=training.model.state_dict(),
        optimizer=training.optimizer.state_dict(),
        scaler=scaler.state_dict() if scaler.is_enabled() else None,
        epoch=metrics.epoch,
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
