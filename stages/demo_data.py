"""`refine demo-data`: draw the synthetic demo detection dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stages.common import console, domain_errors
from stages.options import MAX_SEED


def demo_data(
    out: Annotated[Path, typer.Option(help="Folder to write images/, train.json and val.json into.")] = Path(
        "data/demo"
    ),
    seed: Annotated[
        int, typer.Option(min=0, max=MAX_SEED, help="Random seed; the same seed gives byte-identical files.")
    ] = 0,
    n_train: Annotated[int, typer.Option(min=1, help="Number of training images.")] = 288,
    n_val: Annotated[int, typer.Option(min=1, help="Number of validation images.")] = 48,
    max_objects: Annotated[
        int, typer.Option(min=1, help="Most objects per image (each image draws 1 to this many).")
    ] = 16,
) -> None:
    """Draw a deterministic synthetic detection dataset (COCO JSON + JPEG images)."""
    from pipeline.demo_data import make_demo_dataset  # numpy and PIL load here, not at start-up

    with domain_errors():
        summary = make_demo_dataset(out, seed=seed, n_train=n_train, n_val=n_val, max_objects=max_objects)
    train, val = summary["train"], summary["val"]
    console.print(
        f"wrote {train['images']} train + {val['images']} val images "
        f"({train['annotations']} + {val['annotations']} boxes) to {out}",
        markup=False,
        highlight=False,
    )
