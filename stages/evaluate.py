"""`refine evaluate`: measure a trained refiner against the ground truth."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.figures import Interval
from stages.common import console, domain_errors
from stages.options import (
    MAX_SEED,
    DatasetOption,
    Device,
    MinScoreOption,
    ModelOption,
    RefinerDeviceOption,
    SnapCheckpointOption,
    StoreOption,
    TRAINED_THRESHOLD,
    finite,
    threshold_line,
)


def evaluate(
    store: StoreOption,
    annotations: Annotated[Path, typer.Option(help="COCO ground truth of the images to evaluate on (e.g. val.json).")],
    model: ModelOption = Path("data/refiner/model.pt"),
    out: Annotated[Path, typer.Option(help="Folder for metrics.json and overlays/.")] = Path("data/eval"),
    coarse: Annotated[
        Optional[Path],
        typer.Option(
            help="COCO results file of coarse detections (scored): adds COCO AP before/after. "
            "Default: the noise protocol."
        ),
    ] = None,
    images: Annotated[
        Optional[Path], typer.Option(help="Image root, only to draw overlays. Without it: no overlays.")
    ] = None,
    dataset: DatasetOption = None,
    noise: Annotated[
        Optional[float],
        typer.Option(
            min=0.0,
            max=0.5,
            callback=finite,
            help="Noise r of the coarse boxes. Default: the one the model was trained with.",
        ),
    ] = None,
    seed: Annotated[
        Optional[int],
        typer.Option(min=0, max=MAX_SEED, help="Seed of the fixed noise draw. Default: the training seed."),
    ] = None,
    overlays: Annotated[int, typer.Option(min=0, help="How many overlay PNGs to draw.")] = 8,
    device: RefinerDeviceOption = Device.auto,
    min_score: MinScoreOption = None,
    methods: Annotated[
        str,
        typer.Option(
            help="Comma-separated box methods to score side by side under `methods` in metrics.json: "
            "coarse, snap (zero-shot HQ-SAM), refiner."
        ),
    ] = "refiner",
    checkpoint: SnapCheckpointOption = None,
) -> None:
    """Mean IoU, improved/worse shares and recall at IoU 0.5/0.75/0.9 (by object size) of coarse vs refined boxes."""
    # The library loads here, not at start-up: it imports torch, and `refine --help` must answer at once.
    from pipeline.inference.eval_metrics import METRICS_FILE
    from pipeline.inference.evaluate import EvaluateConfig, run_evaluate

    config = EvaluateConfig(
        store,
        annotations,
        model,
        out,
        coarse,
        images,
        dataset,
        noise,
        seed,
        overlays,
        device.value,
        min_score,
        tuple(m.strip() for m in methods.split(",") if m.strip()),
        checkpoint,
    )
    with domain_errors():
        metrics = run_evaluate(config)
    written, every, abstention = metrics.written, metrics.every_box, metrics.abstention
    auroc = abstention.auroc_worse
    lines = [
        threshold_line(abstention.min_score, "given" if min_score is not None else TRAINED_THRESHOLD),
        f"{written.count} boxes on {metrics.images} images: mean IoU {written.mean_iou_coarse:.3f} -> "
        f"{written.mean_iou_refined:.3f}, improved {written.share_improved:.1%}, "
        f"worse {written.share_worse:.1%}, changed {abstention.share_changed:.1%}",
        f"every box refined: mean IoU {every.mean_iou_refined:.3f}, worse {every.share_worse:.1%}; "
        f"score AUROC for the boxes made worse {'n/a' if auroc is None else f'{auroc:.3f}'}",
    ]
    if metrics.written_interval is not None and metrics.every_box_interval is not None:
        lines.append(interval_line(metrics.written_interval, metrics.every_box_interval))
    for name, figures in metrics.methods.items():
        lines.append(
            f"  {name:<8} mean IoU {figures.mean_iou_refined:.3f}, improved {figures.share_improved:.1%}, "
            f"worse {figures.share_worse:.1%}"
        )
    if metrics.clipped_boxes:
        lines.append(f"{metrics.clipped_boxes} boxes clipped to the image")
    lines.append(f"written to {out / METRICS_FILE}")
    for line in lines:
        console.print(line, markup=False, highlight=False)


def interval_line(written: Interval, every: Interval) -> str:
    """The bootstrap intervals (`pipeline.metrics.image_bootstrap`) of what apply writes and of every box refined."""

    def span(interval: Interval) -> str:
        low_gain, high_gain = interval.mean_iou_gain
        low_worse, high_worse = interval.share_worse
        return f"gain {low_gain:+.3f} to {high_gain:+.3f}, worse {low_worse:.1%} to {high_worse:.1%}"

    return f"{written.level:.0%} interval over resampled images: {span(written)} (every box refined: {span(every)})"
