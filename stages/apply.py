"""`refine apply`: refine every box of a file with a trained refiner."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stages.common import console, domain_errors
from stages.options import DatasetOption, Device, ModelOption, RefinerDeviceOption, StoreOption


def apply(
    store: StoreOption,
    boxes: Annotated[Path, typer.Option(help="COCO results file (list of detections) or COCO dataset file to refine.")],
    out: Annotated[Path, typer.Option(help="Where to write the same structure with refined boxes.")],
    model: ModelOption = Path("data/refiner/model.pt"),
    dataset: DatasetOption = None,
    device: RefinerDeviceOption = Device.auto,
) -> None:
    """Refine every box of a file; every other field kept, nothing dropped, order kept, boxes clipped to the image."""
    # The library loads here, not at start-up: it imports torch, and `refine --help` must answer at once.
    from pipeline.apply import apply_to_file, load_model
    from pipeline.devices import resolve_device
    from pipeline.jsonio import write_json
    from pipeline.store import FeatureStore

    with domain_errors():
        refiner, namespace, _ = load_model(model, FeatureStore(store))
        refined, count = apply_to_file(refiner, namespace, boxes, dataset, resolve_device(device.value))
        write_json(out, refined)
    console.print(f"refined {count} boxes; written to {out}", markup=False, highlight=False)
