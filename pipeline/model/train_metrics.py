"""`train_metrics.json`: `TrainMetrics`, the figures of one trained epoch, its one writer and its one reader.

`train` writes it after the last epoch and stores the same record in every checkpoint (`Checkpoint.metrics`,
read back with `from_json`; `read` reads the file, e.g. for `bench/faults.py`). Among its figures is the
abstention threshold chosen on held-out training images (`AbstentionFit`), which `evaluate`, `apply` and
`review` use by default. The JSON is what it has been since checkpoint version 6:
{"epoch", "train_loss", "abstention", "val": {every box refined, "abstained": what `apply` writes}}.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.coco import read_json
from pipeline.errors import RefineError
from pipeline.figures import READ_ERRORS, BoxFigures, fields, flag, integer, number, optional_number
from pipeline.jsonio import write_json

METRICS_FILE = "train_metrics.json"
# The operating point's figures, absent when there were no held-out boxes to choose on.
POINT_FIGURES = ("mean_iou", "share_changed", "share_worse", "share_worse_bound")


@dataclass(frozen=True)
class AbstentionFit:
    """The threshold `train` chose on held-out boxes (`pipeline.model.abstention.choose_min_score`) and the
    score's fit behind it (`pipeline.model.score.fit_score`, `fit_calibration`)."""

    min_score: float
    max_worse: float
    boxes: int
    reached: bool  # a threshold kept the bound on the share worse within max_worse
    calibration: tuple[float, float]  # (scale, bias) of the score's Platt scaling
    ridge: float | None  # None: too few held-out images to choose one (a constant score)
    # At the threshold, on the held-out boxes; None without any.
    mean_iou: float | None = None
    share_changed: float | None = None
    share_worse: float | None = None
    share_worse_bound: float | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AbstentionFit:
        fields(data, {"min_score", "max_worse", "boxes", "reached", "calibration", "ridge"}, frozenset(POINT_FIGURES))
        calibration = fields(data["calibration"], {"scale", "bias"})
        return cls(
            min_score=number(data["min_score"]),
            max_worse=number(data["max_worse"]),
            boxes=integer(data["boxes"]),
            reached=flag(data["reached"]),
            calibration=(number(calibration["scale"]), number(calibration["bias"])),
            ridge=optional_number(data["ridge"]),
            # Present or absent together, never null: null would not be written back.
            **{name: number(data[name]) for name in POINT_FIGURES if name in data},
        )

    def to_json(self) -> dict[str, Any]:
        point = {name: getattr(self, name) for name in POINT_FIGURES if getattr(self, name) is not None}
        scale, bias = self.calibration
        return {
            "min_score": self.min_score,
            "max_worse": self.max_worse,
            "boxes": self.boxes,
            "reached": self.reached,
            **point,
            "calibration": {"scale": scale, "bias": bias},
            "ridge": self.ridge,
        }


@dataclass(frozen=True)
class TrainMetrics:
    """One epoch's figures (`pipeline.training.train.train_and_validate`)."""

    epoch: int  # 1-based
    train_loss: float
    abstention: AbstentionFit
    val: BoxFigures  # every val box refined
    val_abstained: BoxFigures  # what `apply` writes on val, with the threshold

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainMetrics:
        fields(data, {"epoch", "train_loss", "abstention", "val"})
        if not isinstance(data["val"], dict):
            raise TypeError(f"val: expected an object, got {data['val']!r}")
        val = {key: value for key, value in data["val"].items() if key != "abstained"}
        abstained = data["val"]["abstained"]
        return cls(
            epoch=integer(data["epoch"]),
            train_loss=number(data["train_loss"]),
            abstention=AbstentionFit.from_json(data["abstention"]),
            val=BoxFigures.from_json(val),
            val_abstained=BoxFigures.from_json(abstained),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "train_loss": self.train_loss,
            "abstention": self.abstention.to_json(),
            "val": {**self.val.to_json(), "abstained": self.val_abstained.to_json()},
        }

    @classmethod
    def read(cls, path: Path) -> TrainMetrics:
        """`train_metrics.json` as `write` left it; refused in one line when it is not one."""
        try:
            return cls.from_json(read_json(path))
        except READ_ERRORS as error:
            raise RefineError(f"{path}: not a refine train_metrics.json (bad field: {error})") from None

    def write(self, path: Path) -> None:
        write_json(path, self.to_json(), sort_keys=True)
