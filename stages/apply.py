"""`refine apply`: tighten every box of a file, with a trained refiner or by zero-shot HQ-SAM snap."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from stages.common import console, domain_errors, err_console
from stages.options import (
    DatasetOption,
    Device,
    EncoderName,
    MinScoreOption,
    ModelOption,
    RefinerDeviceOption,
    SnapCheckpointOption,
    StoreOption,
    TRAINED_THRESHOLD,
    finite,
    threshold_line,
)


class Method(str, Enum):
    refiner = "refiner"
    snap = "snap"


def apply(
    store: StoreOption,
    boxes: Annotated[Path, typer.Option(help="COCO results file (list of detections) or COCO dataset file to refine.")],
    out: Annotated[Path, typer.Option(help="Where to write the same structure with refined boxes.")],
    model: ModelOption = Path("data/refiner/model.pt"),
    dataset: DatasetOption = None,
    device: RefinerDeviceOption = Device.auto,
    min_score: MinScoreOption = None,
    method: Annotated[
        Method,
        typer.Option(help="refiner: the trained refiner (--model); snap: HQ-SAM's mask for each box, its tight box."),
    ] = Method.refiner,
    checkpoint: SnapCheckpointOption = None,
    encoder: Annotated[
        Optional[EncoderName], typer.Option(help="snap: the HQ-SAM variant, when several of the store's fit.")
    ] = None,
    masks: Annotated[
        bool, typer.Option(help="snap: also write each mask as COCO RLE `segmentation` (and its area).")
    ] = False,
    multimask: Annotated[
        bool, typer.Option(help="snap: three masks per box, the one with the highest predicted IoU kept.")
    ] = False,
    hq_token_only: Annotated[bool, typer.Option(help="snap: the HQ token's mask alone, not fused with SAM's.")] = False,
    mask_threshold: Annotated[
        float, typer.Option(callback=finite, help="snap: mask logit above which a pixel is in the mask.")
    ] = 0.0,
) -> None:
    """Refine every box of a file: `bbox` becomes the recommended box and `refine` says how far to trust it
    ({score, coarse_bbox, kept_coarse}); every other field kept, nothing dropped, order kept."""
    # The library loads here, not at start-up: it imports torch, and `refine --help` must answer at once.
    from pipeline.inference.apply import apply_file
    from pipeline.inference.core import load_model, refiner_proposer
    from pipeline.devices import resolve_device
    from pipeline.jsonio import write_json
    from pipeline.store import FeatureStore

    with domain_errors():
        feature_store = FeatureStore(store)
        where = resolve_device(device.value)
        if method is Method.snap:
            # HQ-SAM's decoder loads only for snap: the refiner needs none of it.
            from pipeline.inference.snap import SnapOptions, snap_method
            from pipeline.inference.snapper import snap_namespace

            namespace = snap_namespace(feature_store, checkpoint, encoder.value if encoder else None)
            if namespace.provenance.get("random_init"):
                err_console.print(
                    "WARNING: snap with RANDOM-INIT HQ-SAM weights: its masks mean nothing; pass the --checkpoint "
                    "that extracted the store for real snaps",
                    markup=False,
                    highlight=False,
                )
            options = SnapOptions(multimask, hq_token_only, mask_threshold)
            propose = snap_method(namespace, checkpoint, where, options, masks, encoder.value if encoder else None)
            threshold = min_score if min_score is not None else 0.0
            source = "given" if min_score is not None else "snap's default: every box with a mask"
        else:
            refiner, namespace, trained = load_model(model, feature_store)
            propose = refiner_proposer(refiner, namespace, where)
            threshold = trained.min_score(min_score)
            source = "given" if min_score is not None else TRAINED_THRESHOLD
        console.print(threshold_line(threshold, source), markup=False, highlight=False)
        refined, summary = apply_file(propose, namespace, boxes, dataset, threshold)
        write_json(out, refined)
    lines = [
        f"{'snapped' if method is Method.snap else 'refined'} {summary.boxes - summary.kept_coarse} of "
        f"{summary.boxes} boxes, kept the coarse box of {summary.kept_coarse}; written to {out}"
    ]
    if summary.clipped:
        lines.append(f"{summary.clipped} boxes clipped to the image")
    if summary.area_updated:
        lines.append(f"{summary.area_updated} annotation areas follow their new box")
    for line in lines:
        console.print(line, markup=False, highlight=False)
