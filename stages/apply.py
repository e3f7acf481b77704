"""`refine apply`: refine every box of a file with a trained refiner."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stages.common import console, domain_errors
from stages.options import (
    DatasetOption,
    Device,
    MinScoreOption,
    ModelOption,
    RefinerDeviceOption,
    StoreOption,
    threshold_line,
)


def apply(
    store: StoreOption,
    boxes: Annotated[Path, typer.Option(help="COCO results file (list of detections) or COCO dataset file to refine.")],
    out: Annotated[Path, typer.Option(help="Where to write the same structure with refined boxes.")],
    model: ModelOption = Path("data/refiner/model.pt"),
    dataset: DatasetOption = None,
    device: RefinerDeviceOption = Device.auto,
    min_score: MinScoreOption = None,
) -> None:
    """Refine every box of a file: `bbox` becomes the recommended box and `refine` says how far to trust it
    ({score, coarse_bbox, kept_coarse}); every other field kept, nothing dropped, order kept."""
    # The library loads here, not at start-up: it imports torch, and `refine --help` must answer at once.
    from pipeline.apply import apply_to_file, load_model
    from pipeline.checkpoints import min_score_of
    from pipeline.devices import resolve_device
    from pipeline.jsonio import write_json
    from pipeline.store import FeatureStore

    with domain_errors():
        refiner, namespace, checkpoint = load_model(model, FeatureStore(store))
        threshold = min_score if min_score is not None else min_score_of(checkpoint)
        console.print(threshold_line(threshold, min_score is not None), markup=False, highlight=False)
        refined, summary = apply_to_file(refiner, namespace, boxes, dataset, resolve_device(device.value), threshold)
        write_json(out, refined)
    lines = [
        f"refined {summary.boxes - summary.kept_coarse} of {summary.boxes} boxes, kept the coarse box of "
        f"{summary.kept_coarse} (score below {threshold:.3f}); written to {out}"
    ]
    if summary.clipped:
        lines.append(f"{summary.clipped} boxes clipped to the image")
    if summary.area_updated:
        lines.append(f"{summary.area_updated} annotation areas follow their new box")
    for line in lines:
        console.print(line, markup=False, highlight=False)
