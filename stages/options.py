"""Option types more than one command shares; nothing here may import torch (the CLI's help is built from it)."""

from __future__ import annotations

import math
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.model.registry import REFINERS

# The names of `pipeline.hqsam.encoder.ENCODERS`, whose module imports torch; tests/test_cli.py checks that
# they stay equal. The refiners' registry imports nothing heavy.
ENCODER_NAMES = ("vit_tiny", "vit_b", "vit_l", "vit_h")
REFINER_NAMES = tuple(REFINERS)

EncoderName = Enum("EncoderName", {name: name for name in ENCODER_NAMES}, type=str)
RefinerName = Enum("RefinerName", {name: name for name in REFINER_NAMES}, type=str)


# Seeds are mixed as 32-bit words (pipeline.boxes.seeded_generator): a larger one would repeat a smaller one.
MAX_SEED = 2**32 - 1


def finite(value: float | None) -> float | None:
    """Callback of every float option: NaN passes click's range checks (each comparison with NaN is false),
    and a NaN learning rate or threshold would run to the end and write nonsense."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"must be a finite number, got {value}")
    return value


class Device(str, Enum):
    auto = "auto"
    cuda = "cuda"
    cpu = "cpu"


# `refine evaluate` and `refine apply`: a trained refiner on the stored features.
StoreOption = Annotated[str, typer.Option(help="Feature store: a local path or an fsspec URL.")]
ModelOption = Annotated[Path, typer.Option(help="Refiner checkpoint written by `refine train`.")]
DatasetOption = Annotated[
    Optional[str],
    typer.Option(
        help="Dataset name in the store. Default: evaluate uses the annotation file's stem; "
        "apply searches every dataset."
    ),
]
RefinerDeviceOption = Annotated[Device, typer.Option(help="Where the refiner runs; auto picks CUDA when available.")]
MinScoreOption = Annotated[
    Optional[float],
    typer.Option(
        min=0.0,
        max=1.0,
        callback=finite,
        help="Boxes scoring below this keep their coarse box. Default: the threshold `refine train` chose on "
        "held-out training images (stored in the checkpoint); 0 refines every box.",
    ),
]


SnapCheckpointOption = Annotated[
    Optional[Path],
    typer.Option(
        help="snap: the HQ-SAM checkpoint (sam_hq_vit_*.pth) that extracted the store. Default: the seeded "
        "random init the store records."
    ),
]

TRAINED_THRESHOLD = "chosen by `refine train` on held-out training images"


def threshold_line(min_score: float, source: str) -> str:
    """The line `apply`, `evaluate` and `review` print to say which threshold they use and where it came from."""
    return f"min score {min_score:.3f} ({source})"
