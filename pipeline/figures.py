"""The figures the metrics files hold, as types: one group of boxes (`BoxFigures`) and the bootstrap interval
of its gain and share worse (`Interval`).

`pipeline.metrics` computes them as JSON-ready dicts; `from_json` reads such a dict (a fresh one, or one read
back from a file or a checkpoint) and `to_json` gives it back unchanged, so that the metrics records
(`pipeline.model.train_metrics`, `pipeline.inference.eval_metrics`) write exactly what was computed and
their readers use fields, not keys. A missing key or a value of the wrong type raises one of READ_ERRORS, for
the record's reader to turn into one line naming the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# What `from_json` raises on a dict that is not such a record.
READ_ERRORS = (KeyError, TypeError, ValueError, AttributeError, OverflowError)


def number(value: Any) -> float:
    """A JSON number as a float; anything else (a bool included) raises TypeError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"expected a number, got {value!r}")
    return float(value)


def optional_number(value: Any) -> float | None:
    """A JSON number or null."""
    return None if value is None else number(value)


@dataclass(frozen=True)
class BoxFigures:
    """One group of boxes against their ground truth (`pipeline.metrics.iou_summary`); None for every value
    of an empty group."""

    count: int
    mean_iou_coarse: float | None
    mean_iou_refined: float | None
    share_improved: float | None
    share_worse: float | None
    recall_at_iou: dict[str, dict[str, float | None]]  # {"coarse" | "refined": {"0.5" | "0.75" | "0.9": share}}
    by_size: dict[str, BoxFigures] | None = None  # `box_metrics`: the same per COCO size bucket

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BoxFigures:
        by_size = data.get("by_size")
        return cls(
            count=int(number(data["count"])),
            mean_iou_coarse=optional_number(data["mean_iou_coarse"]),
            mean_iou_refined=optional_number(data["mean_iou_refined"]),
            share_improved=optional_number(data["share_improved"]),
            share_worse=optional_number(data["share_worse"]),
            recall_at_iou={
                str(kind): {str(t): optional_number(share) for t, share in shares.items()}
                for kind, shares in data["recall_at_iou"].items()
            },
            by_size=None if by_size is None else {name: cls.from_json(group) for name, group in by_size.items()},
        )

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "count": self.count,
            "mean_iou_coarse": self.mean_iou_coarse,
            "mean_iou_refined": self.mean_iou_refined,
            "share_improved": self.share_improved,
            "share_worse": self.share_worse,
            "recall_at_iou": self.recall_at_iou,
        }
        if self.by_size is not None:
            data["by_size"] = {name: group.to_json() for name, group in self.by_size.items()}
        return data


@dataclass(frozen=True)
class Interval:
    """How far a group's mean IoU gain and share worse move over resampled images
    (`pipeline.metrics.image_bootstrap`): `level` of `resamples` resampled figures lie in each (low, high)."""

    level: float
    resamples: int
    mean_iou_gain: tuple[float, float]
    share_worse: tuple[float, float]

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> Interval | None:
        if data is None:  # an empty group
            return None
        low_gain, high_gain = map(number, data["mean_iou_gain"])
        low_worse, high_worse = map(number, data["share_worse"])
        return cls(
            number(data["level"]), int(number(data["resamples"])), (low_gain, high_gain), (low_worse, high_worse)
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "level": self.level,
            "resamples": self.resamples,
            "mean_iou_gain": list(self.mean_iou_gain),
            "share_worse": list(self.share_worse),
        }
