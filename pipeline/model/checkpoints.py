"""The refiner checkpoint (`model.pt`): `Checkpoint`, its one writer and its one reader.

`train` writes it after every epoch (atomically: a crash while saving leaves the previous one intact);
`train --resume`, `evaluate`, `apply` and `review` read it. It holds the model, optimizer and scaler state,
the epoch, the resolved training config, the refiner's name and config, the store fingerprint of the
features it was trained on, the encoder they came from, and the epoch's metrics, among them the abstention
threshold chosen on held-out training images (`Checkpoint.min_score`). It is read with `weights_only=True`
(no pickled code) and refused, in one line, when it is not a refine checkpoint or is of a version it cannot
read.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import RefineError
from pipeline.figures import READ_ERRORS
from pipeline.jsonio import write_bytes
from pipeline.model.base import Refiner, RefinerConfig
from pipeline.model.registry import build_refiner
from pipeline.model.train_metrics import TrainMetrics
from pipeline.torch_files import read_torch_file

CHECKPOINT = "model.pt"
CHECKPOINT_FORMAT = "refine-refiner"
# Raised whenever a refiner's computation changes: the weights of an older one would load and silently mean
# something else. 2: similarity cues computed on the feature grid instead of in each window. 3: a score
# head and the abstention threshold. 4: the score's calibration (a version 3 checkpoint reads as calibrated
# by the identity, which is what its scores and threshold were). 5: the fine stage on the stride-4 plane
# (a version 4 checkpoint reads as a refiner without it, which is what it was). 6: the score is a logistic
# regression fitted on held-out images (`pipeline.model.score`); the learnt head of versions 3 to 5 has no
# counterpart in it, so those are refused with the line that says to retrain.
CHECKPOINT_VERSION = 6
READABLE_VERSIONS = (6,)
# Options that may change between a run and its --resume. Workers and device do not change what is
# computed; a larger --epochs trains longer (the learning-rate schedule then stretches to the new total).
RESUMABLE = {"epochs", "workers", "device", "resume", "max_worse"}


@dataclass(frozen=True)
class Checkpoint:
    """Everything `--resume`, `evaluate`, `apply` and `review` need, after `epoch` (1-based) epochs."""

    model: dict[str, Any]  # the refiner's state dict
    optimizer: dict[str, Any]
    scaler: dict[str, Any] | None  # None: no fp16 loss scaling
    epoch: int
    config: dict[str, Any]  # the run's `TrainConfig.resolved()`
    refiner_name: str  # its `REFINERS` entry
    refiner_config: RefinerConfig
    fingerprint: str  # the store namespace whose features it was trained on
    encoder: dict[str, Any]  # {model_type, early_channels}
    metrics: TrainMetrics  # the epoch's

    @classmethod
    def load(cls, path: Path) -> Checkpoint:
        """A refiner checkpoint, read safely (weights_only) and checked to be one of a version this reads."""
        if not path.exists():
            raise RefineError(f"{path}: no checkpoint to resume from")
        payload = read_torch_file(path, "refiner checkpoint")
        if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
            raise RefineError(f"{path}: not a refine refiner checkpoint")
        if payload.get("version") not in READABLE_VERSIONS:
            raise RefineError(
                f"{path}: refiner checkpoint version {payload.get('version')}, this refine reads version "
                f"{', '.join(map(str, READABLE_VERSIONS))}; train the refiner again with `refine train`"
            )
        try:
            return cls(
                model=payload["model"],
                optimizer=payload["optimizer"],
                scaler=payload["scaler"],
                epoch=int(payload["epoch"]),
                config=dict(payload["config"]),
                refiner_name=str(payload["refiner"]["name"]),
                refiner_config=RefinerConfig.from_dict(payload["refiner"]["config"]),
                fingerprint=str(payload["fingerprint"]),
                encoder=dict(payload["encoder"]),
                metrics=TrainMetrics.from_json(payload["metrics"]),
            )
        except READ_ERRORS as error:
            raise RefineError(f"{path}: a damaged refiner checkpoint (bad field: {error})") from None

    def save(self, path: Path) -> None:
        """Write atomically: a crash while saving leaves the previous checkpoint intact."""
        buffer = io.BytesIO()  # a refiner checkpoint is a few MB
        torch.save(self.payload(), buffer)
        write_bytes(path, buffer.getvalue(), what="the refiner checkpoint")

    def payload(self) -> dict[str, Any]:
        """The checkpoint as `model.pt` holds it."""
        return {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "model": self.model,
            "optimizer": self.optimizer,
            "scaler": self.scaler,
            "epoch": self.epoch,
            "config": self.config,
            "refiner": {"name": self.refiner_name, "config": self.refiner_config.to_dict()},
            "fingerprint": self.fingerprint,
            "encoder": self.encoder,
            "metrics": self.metrics.to_json(),
        }

    def refiner(self) -> Refiner:
        """The trained refiner, in eval mode."""
        model = build_refiner(self.refiner_name, self.refiner_config)
        model.load_state_dict(self.model)
        return model.eval()

    def min_score(self, given: float | None = None) -> float:
        """The abstention threshold to use: `given` (a user's --min-score) when there is one, else the one
        `train` chose on its held-out images (0: refine every box)."""
        return given if given is not None else self.metrics.abstention.min_score

    @property
    def noise(self) -> float:
        """The noise level of the coarse boxes it was trained on (what `evaluate` draws by default)."""
        return float(self.config["noise"])

    @property
    def seed(self) -> int:
        return int(self.config["seed"])

    @property
    def holdout(self) -> float:
        """The share of training images held out to fit the score and choose the threshold on."""
        return float(self.config["holdout"])

    def check_resume(self, config: dict[str, Any], refiner_config: RefinerConfig, fingerprint: str, path: Path) -> None:
        """Refuse to resume from `path` on other features or with settings that change what is computed.

        config: the new run's `TrainConfig.resolved()`; refiner_config: the refiner it builds; fingerprint: the
        namespace it reads.
        """
        if self.fingerprint != fingerprint:
            raise RefineError(
                f"{path}: was trained on features of encoder {self.fingerprint} "
                f"({self.encoder['model_type']}), but the store's dataset has {fingerprint}; "
                "train afresh without --resume"
            )
        changed = sorted(k for k in config if k not in RESUMABLE and self.config.get(k) != config[k])
        if changed:
            details = ", ".join(f"{k}: {self.config.get(k)!r} -> {config[k]!r}" for k in changed)
            raise RefineError(f"{path}: --resume with different settings ({details}); train afresh without --resume")
        if refiner_config != self.refiner_config:  # the same options, but this refine builds another refiner
            old, new = self.refiner_config.to_dict(), refiner_config.to_dict()
            details = ", ".join(f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in sorted(new) if old.get(k) != new[k])
            raise RefineError(f"{path}: --resume with another refiner shape ({details}); train afresh without --resume")
