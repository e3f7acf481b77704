"""`evaluate`'s record: `EvalMetrics`, written as `metrics.json` and, for DVC plots, one file per curve.

refine itself never reads these files back (DVC, the README's tables and users do), so the type is their one
writer; `evaluate` returns it for its summary. The JSON keeps the figures of what `apply` writes at the top
level, those of every box refined under "without_abstention", and each method's under "methods".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.figures import BoxFigures, Interval
from pipeline.metrics import write_metrics

METRICS_FILE = "metrics.json"


@dataclass(frozen=True)
class ScoreFigures:
    """The threshold used and how well the score sorts the boxes."""

    min_score: float
    min_score_source: str  # "given", or the checkpoint's held-out training images
    share_changed: float  # of the boxes, refined (score >= min_score)
    # How well a low score picks out the boxes refining makes worse (0.5: no better than chance; None
    # without both kinds).
    auroc_worse: float | None


@dataclass(frozen=True)
class EvalMetrics:
    """Everything `evaluate` measured on one split: what `apply` writes and every box refined (each with its
    interval over resampled images), the score, the curves and each method's boxes."""

    written: BoxFigures  # what `apply` writes, abstention included, overall and by size
    written_interval: Interval | None  # None: no boxes
    every_box: BoxFigures  # every box refined
    every_box_interval: Interval | None
    abstention: ScoreFigures
    images: int
    clipped_boxes: int
    coarse_source: str  # the results file, or the noise protocol and its seed
    # Curves, also written to files of their own (`curves`): the trade-off of the threshold
    # (`pipeline.model.abstention.risk_coverage`) and the score's calibration (`reliability`).
    risk_coverage: list[dict[str, float]]
    reliability: list[dict[str, Any]]
    methods: dict[str, BoxFigures]  # `evaluate --methods`, each method's boxes as the refined ones
    coco_ap: dict[str, dict[str, float | None]] | None = None  # {"coarse" | "refined": `coco_ap`}, results files only

    def curves(self) -> dict[str, list[dict[str, Any]]]:
        """The curves DVC plots, by file name (without .json)."""
        return {"risk_coverage": self.risk_coverage, "reliability": self.reliability}

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            **self.written.to_json(),
            "interval": _interval(self.written_interval),
            "without_abstention": {**self.every_box.to_json(), "interval": _interval(self.every_box_interval)},
            "abstention": {
                "min_score": self.abstention.min_score,
                "min_score_source": self.abstention.min_score_source,
                "share_changed": self.abstention.share_changed,
                "auroc_worse": self.abstention.auroc_worse,
            },
            "images": self.images,
            "clipped_boxes": self.clipped_boxes,
            "coarse_source": self.coarse_source,
            **self.curves(),
            "methods": {name: figures.to_json() for name, figures in self.methods.items()},
        }
        if self.coco_ap is not None:
            data["coco_ap"] = self.coco_ap
        return data

    def write(self, out: Path) -> None:
        """`<out>/metrics.json` and `<out>/<curve>.json` (`write_metrics`: only a changed value changes them)."""
        write_metrics(out / METRICS_FILE, self.to_json())
        for name, curve in self.curves().items():
            write_metrics(out / f"{name}.json", curve)


def _interval(interval: Interval | None) -> dict[str, Any] | None:
    return None if interval is None else interval.to_json()
