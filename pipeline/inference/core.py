"""The inference core: a trained refiner (or snap) as a box method on one store namespace, like
segment-anything's `SamPredictor`: an entry and its coarse boxes (original pixels) -> a proposal per box
with its score, and the box `refine` recommends. `apply`, `evaluate` and `review` reach the model only here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pipeline.boxes import to_input, to_original, valid_boxes
from pipeline.errors import RefineError
from pipeline.model.base import Refiner
from pipeline.model.checkpoints import Checkpoint
from pipeline.store import Entry, FeatureStore, Namespace


def load_model(path: Path, store: FeatureStore) -> tuple[Refiner, Namespace, Checkpoint]:
    """The refiner of a checkpoint, the store namespace of the encoder it was trained on, the checkpoint."""
    if not path.is_file():
        raise RefineError(f"{path}: model checkpoint not found; run `refine train` first")
    checkpoint = Checkpoint.load(path)
    fingerprint = checkpoint.fingerprint
    if fingerprint not in store.fingerprints():
        known = ", ".join(store.fingerprints()) or "none"
        raise RefineError(
            f"{path}: was trained on features of encoder {fingerprint} ({checkpoint.encoder['model_type']}), "
            f"but {store.url} holds none of them (it has: {known}); extract with that encoder first"
        )
    return checkpoint.refiner(), Namespace.open(store, fingerprint), checkpoint


@torch.inference_mode()
def refine_boxes(
    model: Refiner, namespace: Namespace, entry: Entry, boxes: Tensor, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Refine one image's boxes (N x 4 xyxy, original pixels, inside the image) from one read of its features.

    Returns the refined boxes (N x 4 valid xyxy, original pixels, inside the image; see `valid_boxes`) and
    their scores (N, in [0, 1]).
    """
    if boxes.numel() == 0:
        return boxes.reshape(0, 4), boxes.new_zeros(0)
    # Never refine from damaged features; an entry without the plane the fine stage reads is refused in
    # one line that names the command adding it.
    embedding, early, plane = namespace.read_inputs(entry, with_plane=model.needs_plane, check=True)
    inputs = to_input(boxes.float(), entry.original_size, entry.resized_size)
    (refined,), (score,) = model(
        torch.tensor(embedding[None], dtype=torch.float32, device=device),  # the stored arrays are read-only
        torch.tensor(early[None], dtype=torch.float32, device=device),
        [inputs.to(device)],
        None if plane is None else torch.tensor(plane[None], device=device),
    )
    refined = to_original(refined.float().cpu(), entry.original_size, entry.resized_size)
    return valid_boxes(refined, boxes, entry.original_size), score.float().cpu()


def recommend(
    coarse: Tensor, refined: Tensor, score: Tensor, min_score: float, failed: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The boxes `refine` recommends (N x 4): the refined box where its score reaches `min_score` (and the
    method did not fail on it: N bools, e.g. an empty snap mask), else the coarse box; and which kept the
    coarse box (N bools)."""
    kept = score < min_score if failed is None else failed | (score < min_score)
    return torch.where(kept[:, None], coarse, refined), kept


@dataclass(frozen=True)
class Proposal:
    """What a box method proposes for one image's N boxes (xyxy, original pixels, inside the image)."""

    boxes: Tensor  # N x 4
    scores: Tensor  # N, in [0, 1]
    failed: Tensor  # N bools: no proposal (an empty snap mask); the coarse box stays
    masks: list[dict[str, Any]] | None = None  # N COCO RLEs, from methods that make masks


# entry, N x 4 coarse boxes (original pixels, inside the image) -> the method's proposal for them
Proposer = Callable[[Entry, Tensor], Proposal]


def refiner_proposer(model: Refiner, namespace: Namespace, device: torch.device) -> Proposer:
    """The trained refiner as a box method: one read of each image's features for all its boxes."""
    model = model.to(device)

    def propose(entry: Entry, coarse: Tensor) -> Proposal:
        refined, score = refine_boxes(model, namespace, entry, coarse, device)
        return Proposal(refined, score, torch.zeros(len(coarse), dtype=torch.bool))

    return propose
