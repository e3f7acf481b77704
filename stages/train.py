"""`refine train`: fit the box refiner on stored features (never the encoder, never an image file)."""

from __future__ import annotations

import math
import time
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, ProgressColumn, TextColumn, TimeElapsedColumn

from pipeline.training.config import TrainConfig
from stages.common import console, domain_errors
from stages.options import MAX_SEED, Device, RefinerName, finite
from stages.progress import PhaseProgress, eta

if TYPE_CHECKING:
    from pipeline.training.engine import TrainProgress
    from pipeline.training.train import TrainSummary

DEFAULTS = TrainConfig(store="", annotations=Path())


class Amp(str, Enum):
    auto = "auto"
    bf16 = "bf16"
    fp16 = "fp16"
    off = "off"


def train(
    store: Annotated[str, typer.Option(help="Feature store written by `refine extract` (local path or fsspec URL).")],
    annotations: Annotated[Path, typer.Option(help="COCO JSON of the training images and their ground-truth boxes.")],
    out: Annotated[
        Path, typer.Option(help="Output directory: model.pt, train_metrics.json, live/ (dvclive).")
    ] = DEFAULTS.out,
    val_annotations: Annotated[
        Optional[Path],
        typer.Option(help="COCO JSON of the validation images. Default: validate on the training images."),
    ] = None,
    dataset: Annotated[
        Optional[str], typer.Option(help="Dataset name in the store. Default: the stem of --annotations.")
    ] = None,
    val_dataset: Annotated[
        Optional[str],
        typer.Option(help="Validation dataset name in the store. Default: the stem of --val-annotations."),
    ] = None,
    fingerprint: Annotated[
        Optional[str],
        typer.Option(help="Encoder namespace to read; needed only when several encoders extracted the dataset."),
    ] = None,
    coarse: Annotated[
        Optional[Path],
        typer.Option(
            help="COCO results file of coarse training boxes (matched to ground truth at IoU >= 0.5). Default: --noise."
        ),
    ] = None,
    val_coarse: Annotated[
        Optional[Path], typer.Option(help="COCO results file of coarse validation boxes. Default: --noise.")
    ] = None,
    noise: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=0.5,
            callback=finite,
            help="OA-MIL noise level r for coarse boxes made from the ground truth (centre +-r, size x(1+-r)).",
        ),
    ] = DEFAULTS.noise,
    jitters: Annotated[
        int,
        typer.Option(
            min=1, help="Noisy copies of each ground-truth box per epoch, all trained from one read of the image."
        ),
    ] = DEFAULTS.jitters,
    holdout: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=0.95,
            callback=finite,
            help="Share of the training images not trained on: the box score is fitted and the abstention threshold "
            "chosen on them (0: a constant score, every box refined).",
        ),
    ] = DEFAULTS.holdout,
    max_worse: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=1.0,
            callback=finite,
            help="The threshold keeps the share of held-out boxes made worse at most this, at 90% confidence "
            "(highest mean IoU among those that do). New images showed more harm than the held-out ones: 0.02 "
            "is the default for a 3% aim.",
        ),
    ] = DEFAULTS.max_worse,
    epochs: Annotated[
        int,
        typer.Option(
            min=1,
            help="Epochs in total, counting those a --resume continues "
            "(raising it with --resume stretches the schedule).",
        ),
    ] = DEFAULTS.epochs,
    batch_size: Annotated[
        int,
        typer.Option(min=1, help="Images per step (each with all its boxes); under torchrun over all ranks together."),
    ] = DEFAULTS.batch_size,
    lr: Annotated[
        float,
        typer.Option(min=0.0, callback=finite, help="Peak learning rate (AdamW, linear warm-up then cosine decay)."),
    ] = DEFAULTS.lr,
    weight_decay: Annotated[
        float, typer.Option(min=0.0, callback=finite, help="AdamW weight decay.")
    ] = DEFAULTS.weight_decay,
    model: Annotated[RefinerName, typer.Option(help="Refiner architecture.")] = RefinerName(DEFAULTS.model),
    plane_pool: Annotated[
        int,
        typer.Option(
            min=0,
            max=128,
            help="Samples per window side of the fine stage, which places each side on the stride-4 image plane "
            "stored beside the features (0: no fine stage; the refiner then reads stores of older layouts too).",
        ),
    ] = DEFAULTS.plane_pool,
    plane_width: Annotated[
        int, typer.Option(min=1, max=256, help="Channels of the fine stage's convolutional net.")
    ] = DEFAULTS.plane_width,
    amp: Annotated[
        Amp, typer.Option(help="Mixed precision: auto = bf16 on CUDA where supported, else fp16 on CUDA, fp32 on CPU.")
    ] = Amp.auto,
    seed: Annotated[
        int, typer.Option(min=0, max=MAX_SEED, help="Seed of the weights, the batch order and the box noise.")
    ] = DEFAULTS.seed,
    resume: Annotated[bool, typer.Option(help="Continue from <out>/model.pt exactly where it stopped.")] = False,
    workers: Annotated[
        Optional[int], typer.Option(min=0, help="DataLoader workers reading the store. Default: 0 on CPU, 2 on CUDA.")
    ] = None,
    device: Annotated[Device, typer.Option(help="Where to train; auto picks CUDA when available.")] = Device.auto,
) -> None:
    """Train the box refiner from the feature store and box annotations; never loads the encoder or an image.

    Fails (exit 1) before training when an annotated image has no features in the store (it names the
    `refine extract` command to run), when the dataset was extracted by several encoders and no
    --fingerprint picks one, or when --resume meets a checkpoint of other settings or another encoder;
    and during training if the loss becomes NaN or infinite.

    Under torchrun: DistributedDataParallel, each rank reading its share of the images from the store;
    the main rank writes the checkpoint, curves and metrics (see README, Scale).
    """
    # The library loads here, not at start-up: it imports torch, and `refine --help` must answer at once.
    from pipeline import distributed
    from pipeline.devices import resolve_device
    from pipeline.training.train import run_train

    config = TrainConfig(
        store=store,
        annotations=annotations,
        out=out,
        val_annotations=val_annotations,
        dataset=dataset,
        val_dataset=val_dataset,
        fingerprint=fingerprint,
        coarse=coarse,
        val_coarse=val_coarse,
        noise=noise,
        jitters=jitters,
        holdout=holdout,
        max_worse=max_worse,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        model=model.value,
        plane_pool=plane_pool,
        plane_width=plane_width,
        amp=amp.value,
        seed=seed,
        resume=resume,
        workers=workers,
        device=device.value,
    )
    with domain_errors():
        backend = "nccl" if resolve_device(device.value).type == "cuda" else "gloo"
        with distributed.process_group(backend):
            main = distributed.is_main()
            with TrainProgressDisplay(enabled=main) as report:
                summary = run_train(config, report)
    if main:
        _print_summary(summary)


class TrainProgressDisplay(PhaseProgress):
    """Progress of each epoch and its validation, fed by `run_train`'s callback."""

    def __init__(self, enabled: bool = True) -> None:
        super().__init__(enabled)
        self.first: tuple[int, float] | None = None  # (step of the run, time) of the first step seen

    def columns(self) -> tuple[ProgressColumn, ...]:
        return (
            TextColumn("{task.description:<14}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(),
        )

    def report(self, event: TrainProgress) -> None:
        description = f"epoch {event.epoch}/{event.epochs}" if event.phase == "train" else f"  {_label(event)}"
        loss = "" if math.isnan(event.loss) else f"loss {event.loss:.4f}  "
        stats = f"{loss}{event.boxes_per_s:7.1f} boxes/s  data wait {event.data_wait_share:4.0%}"
        self.update((event.phase, event.epoch), description, event.steps, event.step, stats=stats)

    def status_line(self, event: TrainProgress) -> None:
        if event.phase != "train":
            self.status(
                f"epoch {event.epoch}/{event.epochs} {_label(event)} {event.step}/{event.steps}, "
                f"{event.boxes_per_s:.1f} boxes/s"
            )
            return
        step = (event.epoch - 1) * event.steps + event.step  # of the whole run, counting what a --resume skips
        now = time.monotonic()
        if self.first is None:  # the clock starts here: setting up (statistics, model) is no step
            self.first = (step, now)
        done, elapsed = step - self.first[0], now - self.first[1]  # validation included, as it will be ahead
        self.status(
            f"epoch {event.epoch}/{event.epochs} step {event.step}/{event.steps}, loss {event.loss:.4f}, "
            f"{event.boxes_per_s:.1f} boxes/s, data wait {event.data_wait_share:.0%}, "
            f"ETA {eta(event.epochs * event.steps - step, done, elapsed)}"
        )


def _label(event: TrainProgress) -> str:
    """How a phase other than training is named: validation, or the pass over the held-out images."""
    return "validate" if event.phase == "val" else event.phase


def _print_summary(summary: TrainSummary) -> None:
    from pipeline.model.checkpoints import CHECKPOINT
    from pipeline.model.train_metrics import METRICS_FILE

    assert summary.metrics is not None
    metrics = summary.metrics
    val, written, abstention = metrics.val, metrics.val_abstained, metrics.abstention
    ran = (
        f"epochs {summary.start_epoch + 1}-{metrics.epoch} on {summary.device} (amp {summary.amp}) "
        f"in {summary.wall_s:.1f} s"
        if summary.epochs_run
        else f"nothing to do: the checkpoint already holds {metrics.epoch} epochs"
    )
    if not abstention.boxes:
        threshold = "no held-out images (--holdout 0): the score is a constant and every box is refined"
    else:
        threshold = (
            f"min score {abstention.min_score:.3f}, chosen on {abstention.boxes} boxes of held-out training "
            f"images for at most {abstention.max_worse:.1%} made worse (90% bound)"
        )
    lines = [
        f"trained on {len(summary.train.images) - summary.held_out} images and held out {summary.held_out} of "
        f"{summary.train.dataset} ({summary.train.boxes} boxes), validated on "
        f"{len(summary.val.images)} images ({val.count} boxes); features of encoder {summary.fingerprint}",
        f"{ran}; train loss {metrics.train_loss:.4f}",
        threshold,
        f"val mean IoU {val.mean_iou_coarse:.3f} -> {written.mean_iou_refined:.3f}, "
        f"improved {written.share_improved:.1%}, worse {written.share_worse:.1%} "
        f"(every box refined: {val.mean_iou_refined:.3f}, worse {val.share_worse:.1%})"
        if val.count
        else "no validation boxes",
        f"wrote {summary.out / CHECKPOINT} and {summary.out / METRICS_FILE}",
    ]
    for split in (summary.train, summary.val):
        if split.clipped_boxes:
            lines.append(f"dataset {split.dataset}: {split.clipped_boxes} boxes clipped to the image")
        if split.without_boxes or split.skipped_by_extract:
            lines.append(
                f"dataset {split.dataset}: {split.without_boxes} image(s) without boxes and "
                f"{split.skipped_by_extract} unreadable at extract time were left out"
            )
    for line in lines:
        console.print(line, markup=False, highlight=False)
