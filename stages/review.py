"""`refine review`: a self-contained page that shows every box a trained refiner changes (or keeps)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from stages.common import console, domain_errors
from stages.options import (
    DatasetOption,
    Device,
    MinScoreOption,
    ModelOption,
    RefinerDeviceOption,
    StoreOption,
    TRAINED_THRESHOLD,
    threshold_line,
)


def review(
    store: StoreOption,
    images: Annotated[Path, typer.Option(help="Image root the file names are relative to (for the crops).")],
    out: Annotated[Path, typer.Option(help="Folder to write index.html and crops/ into (replaces an earlier review).")],
    model: ModelOption = Path("data/refiner/model.pt"),
    boxes: Annotated[
        Optional[Path], typer.Option(help="COCO results list or dataset whose boxes to refine and review.")
    ] = None,
    annotations: Annotated[
        Optional[Path],
        typer.Option(
            help="COCO ground truth instead of --boxes: its boxes are loosened by the training noise, refined, "
            "and shown against the truth."
        ),
    ] = None,
    dataset: DatasetOption = None,
    min_score: MinScoreOption = None,
    device: RefinerDeviceOption = Device.auto,
) -> None:
    """Write a review page: one card per box (crop, coarse / refined / truth boxes, score, move per side), views
    by lowest score, largest change and made worse, a category filter; no network needed to open it."""
    if (boxes is None) == (annotations is None):
        raise typer.BadParameter("give exactly one of --boxes and --annotations")
    # The library loads here, not at start-up: it imports torch, and `refine --help` must answer at once.
    from pipeline.inference.review_run import ReviewConfig, run_review

    config = ReviewConfig(store, model, images, out, boxes, annotations, dataset, min_score, device.value)
    with domain_errors():
        threshold, figures = run_review(config)
    source = "given" if min_score is not None else TRAINED_THRESHOLD
    console.print(threshold_line(threshold, source), markup=False, highlight=False)
    summary = ", ".join(f"{label} {value}" for label, value in figures.items() if label != "min score")
    console.print(f"{summary}; open {out / 'index.html'}", markup=False, highlight=False)
