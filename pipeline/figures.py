"""The figures the metrics files hold, as types: one group of boxes (`BoxFigures`) and the bootstrap interval
of its gain and share worse (`Interval`), with the checks every metrics record reads its JSON by.

`pipeline.metrics` computes them as JSON-ready dicts; `from_json` reads such a dict (a fresh one, or one read
back from a file or a checkpoint) and `to_json` gives exactly it back, so that the metrics records
(`pipeline.model.train_metrics`, `pipeline.inference.eval_metrics`) write what was computed and their
readers use fields, not keys. A missing or unknown key, or a value of the wrong type, raises one of
READ_ERRORS, for the record's reader to turn into one line naming the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# What `from_json` raises on a dict that is not such a record.
READ_ERRORS = (KeyError, TypeError, ValueError, AttributeError, OverflowError)


def number(value: Any) -> float:
    """A JSON number, as it was read (an int stays an int, so it is written back the same); anything else, a
    bool included, raises TypeError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"expected a number, got {value!r}")
    return value


def optional_number(value: Any) -> float | None:
    """A JSON number or null."""
    return None if value is None else number(value)


def integer(value: Any) -> int:
    """A JSON integer, at least 0 (a count)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise TypeError(f"expected a count, got {value!r}")
    return value


def flag(value: Any) -> bool:
    """A JSON true or false."""
    if not isinstance(value, bool):
        raise TypeError(f"expected true or false, got {value!r}")
    return value


def fields(data: dict[str, Any], required: set[str], optional: frozenset[str] = frozenset()) -> dict[str, Any]:
    """`data`, checked to be a dict with every key of `required` and no key outside it and `optional`: a field
    that a record would not write back is refused, never dropped."""
    if not isinstance(data, dict):
        raise TypeError(f"expected an object, got {type(data).__name__}")
    missing, unknown = required - data.keys(), data.keys() - required - optional
    if missing:
        raise KeyError(f"missing {', '.join(sorted(missing))}")
    if unknown:
        raise ValueError(f"unknown field {', '.join(sorted(map(str, unknown)))}")
    return data


# The figures of a group besides its count and recall, each a number or None.
FIGURES = ("mean_iou_coarse", "mean_iou_refined", "share_improved", "share_worse")


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
        fields(data, {"count", *FIGURES, "recall_at_iou"}, frozenset({"by_size"}))
        by_size = data.get("by_size")
        if "by_size" in data and not isinstance(by_size, dict):  # null would not be written back
            raise TypeError(f"by_size: expected an object, got {by_size!r}")
        return cls(
            count=integer(data["count"]),
            mean_iou_coarse=optional_number(data["mean_iou_coarse"]),
            mean_iou_refined=optional_number(data["mean_iou_refined"]),
            share_improved=optional_number(data["share_improved"]),
            share_worse=optional_number(data["share_worse"]),
            recall_at_iou={
                str(kind): {str(t): optional_number(share) for t, share in shares.items()}
                for kind, shares in data["recall_at_iou"].items()
            },
            by_size=None if by_size is None else {str(name): cls.from_json(g) for name, g in by_size.items()},
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
        fields(data, {"level", "resamples", "mean_iou_gain", "share_worse"})
        low_gain, high_gain = map(number, data["mean_iou_gain"])  # exactly two numbers each
        low_worse, high_worse = map(number, data["share_worse"])
        return cls(number(data["level"]), integer(data["resamples"]), (low_gain, high_gain), (low_worse, high_worse))

    def to_json(self) -> dict[str, Any]:
        return {
            "level": self.level,
            "resamples": self.resamples,
            "mean_iou_gain": list(self.mean_iou_gain),
            "share_worse": list(self.share_worse),
        }
