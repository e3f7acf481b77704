"""The refiner checkpoint (`model.pt`): its one writer and its one reader.

`train` writes it after every epoch (atomically: a crash while saving leaves the previous one intact);
`train --resume`, `evaluate` and `apply` read it. It holds the model, optimizer and scaler state, the
epoch, the resolved training config, the refiner's name and config, the store fingerprint of the features
it was trained on, the encoder they came from, and the epoch's metrics, among them the abstention threshold
chosen on held-out training images (`min_score_of`). It is read with `weights_only=True` (no pickled code)
and refused, in one line, when it is not a refine checkpoint or is of a version it cannot read.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import RefineError
from pipeline.jsonio import write_bytes
from pipeline.refiner import RefinerConfig, SimilarityCascadeRefiner, build_refiner
from pipeline.torch_files import read_torch_file

CHECKPOINT = "model.pt"
CHECKPOINT_FORMAT = "refine-refiner"
# Raised whenever a refiner's computation changes: the weights of an older one would load and silently mean
# something else. 2: similarity cues computed on the feature grid instead of in each window. 3: a score
# head and the abstention threshold. 4: the score's calibration (a version 3 checkpoint reads as calibrated
# by the identity, which is what its scores and threshold were). 5: the fine stage on the stride-4 plane
# (a version 4 checkpoint reads as a refiner without it, which is what it was). 6: the score is a logistic
# regression fitted on held-out images (`pipeline.score`); the learnt head of versions 3 to 5 has no
# counterpart in it, so those are refused with the line that says to retrain.
CHECKPOINT_VERSION = 6
READABLE_VERSIONS = (6,)
# Options that may change between a run and its --resume. Workers and device do not change what is
# computed; a larger --epochs trains longer (the learning-rate schedule then stretches to the new total).
RESUMABLE = {"epochs", "workers", "device", "resume", "max_worse"}


def checkpoint_payload(
    *,
    model: SimilarityCascadeRefiner,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    epoch: int,
    config: dict[str, Any],
    refiner_name: str,
    refiner_config: RefinerConfig,
    fingerprint: str,
    encoder: dict[str, Any],
    metrics: dict[str, Any],
) -> dict[str, Any]:
    """Everything `--resume`, `evaluate` and `apply` need, after `epoch` (1-based) epochs.

    config: the run's `TrainConfig.resolved()`; encoder: {model_type, early_channels}; metrics: the epoch's.
    """
    return {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler.is_enabled() else None,
        "epoch": epoch,
        "config": config,
        "refiner": {"name": refiner_name, "config": refiner_config.to_dict()},
        "fingerprint": fingerprint,
        "encoder": encoder,
        "metrics": metrics,
    }


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write atomically: a crash while saving leaves the previous checkpoint intact."""
    buffer = io.BytesIO()  # a refiner checkpoint is a few MB
    torch.save(payload, buffer)
    write_bytes(path, buffer.getvalue(), what="the refiner checkpoint")


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A refiner checkpoint, read safely (weights_only) and checked to be one."""
    if not path.exists():
        raise RefineError(f"{path}: no checkpoint to resume from")
    checkpoint = read_torch_file(path, "refiner checkpoint")
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise RefineError(f"{path}: not a refine refiner checkpoint")
    if checkpoint.get("version") not in READABLE_VERSIONS:
        raise RefineError(
            f"{path}: refiner checkpoint version {checkpoint.get('version')}, this refine reads version "
            f"{', '.join(map(str, READABLE_VERSIONS))}; train the refiner again with `refine train`"
        )
    return checkpoint


def min_score_of(checkpoint: dict[str, Any], given: float | None = None) -> float:
    """The abstention threshold to use: `given` (a user's --min-score) when there is one, else the one `train`
    chose on its held-out images (0: refine every box)."""
    return given if given is not None else float(checkpoint["metrics"]["abstention"]["min_score"])


def refiner_from_checkpoint(checkpoint: dict[str, Any]) -> SimilarityCascadeRefiner:
    """The trained refiner of a checkpoint, in eval mode."""
    model = build_refiner(checkpoint["refiner"]["name"], RefinerConfig.from_dict(checkpoint["refiner"]["config"]))
    model.load_state_dict(checkpoint["model"])
    return model.eval()


def check_resume(checkpoint: dict[str, Any], config: dict[str, Any], fingerprint: str, path: Path) -> None:
    """Refuse to resume from `path` on other features or with settings that change what is computed.

    config: the new run's `TrainConfig.resolved()`; fingerprint: the namespace it reads.
    """
    if checkpoint["fingerprint"] != fingerprint:
        raise RefineError(
            f"{path}: was trained on features of encoder {checkpoint['fingerprint']} "
            f"({checkpoint['encoder']['model_type']}), but the store's dataset has {fingerprint}; "
            "train afresh without --resume"
        )
    before = checkpoint["config"]
    changed = sorted(k for k in config if k not in RESUMABLE and before.get(k) != config[k])
    if changed:
        details = ", ".join(f"{k}: {before.get(k)!r} -> {config[k]!r}" for k in changed)
        raise RefineError(f"{path}: --resume with different settings ({details}); train afresh without --resume")
