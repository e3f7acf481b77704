"""What every refiner variant is to `train`, the checkpoint and inference: `Refiner`, its config and its output.

A variant subclasses `Refiner`, implements `forward_stages`, and is one line in `pipeline.model.registry`;
`train`, `apply`, `evaluate`, `review` and the checkpoint then need no change.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import Tensor, nn

from pipeline.model.score import BoxScore


@dataclass(frozen=True)
class RefinerConfig:
    """Hyper-parameters of a refiner; stored in checkpoints as a plain dict."""

    early_channels: int
    dim: int = 64  # channels the whitened early feature is projected to before windows are pooled
    trunk: int = 1  # 3x3 convolutions on the projected 64 x 64 map (context: 16 px cells are coarse)
    width: int = 16  # channels of each stage's convolutional net on the cue maps
    pool: int = 24  # RoIAlign output size (pool x pool samples over the enlarged window)
    learned: int = 8  # learnt channels of the early feature given to each stage next to the fixed cues
    contexts: tuple[float, ...] = (2.0, 1.5)  # window size / box size, one per cascade stage
    min_window: float = 48.0  # smallest window side in pixels: tiny boxes still see their surroundings
    prior_width: float = 0.1  # spread (window units) of each side's prior around the current side
    interior: float = 0.3  # the object prototype averages the box's central part, +- this share of its size
    plane_pool: int = 0  # samples per window side of the fine stage on the stride-4 plane (0: no fine stage)
    plane_width: int = 16  # channels of the fine stage's convolutional net
    plane_context: float = 1.3  # the fine stage's window size / box size
    plane_prior_width: float = 0.06  # spread (window units) of the fine stage's prior around the cascade's side

    def to_dict(self) -> dict:
        return {**asdict(self), "contexts": list(self.contexts)}

    @classmethod
    def from_dict(cls, values: dict) -> RefinerConfig:
        return cls(**{**values, "contexts": tuple(values["contexts"])})


@dataclass
class Refinement:
    """Every stage's boxes (K x 4 each, last = final, all images' boxes in order), the evidence the score
    reads (K x F), its logits (K) and the spread of the final stage's side distributions (K x 4, window
    units; `bench/score.py` compares it with the score)."""

    stages: list[Tensor]
    evidence: Tensor
    score_logits: Tensor
    spread: Tensor


class Refiner(nn.Module):
    """Stored features of B images + their coarse boxes -> every stage's boxes and the score's evidence.

    Shapes (N_i boxes in image i, K = sum of N_i, C = the encoder's early channels):
      embedding  B x 256 x 64 x 64    early  B x C x 64 x 64    boxes  list of N_i x 4 xyxy (1024 frame)
      plane      B x 3 x 256 x 256 uint8, the entries' stride-4 planes, when `needs_plane`

    A subclass sets `config` and `score` (a `BoxScore` over its evidence, which `train` fits on held-out
    images) and implements `forward_stages`; its stages are what the loss trains.
    """

    config: RefinerConfig
    score: BoxScore

    @property
    def needs_plane(self) -> bool:
        """Whether this refiner reads the stride-4 image plane of each entry."""
        return False

    def set_feature_statistics(self, stats: dict[str, Tensor]) -> None:
        """Install training-set statistics {embedding_mean, embedding_cov, early_mean, early_cov}; a refiner
        that normalises nothing ignores them."""

    def forward_stages(
        self, embedding: Tensor, early: Tensor, boxes: list[Tensor], plane: Tensor | None = None
    ) -> Refinement:
        """Every stage's boxes and the score's evidence and logits (all images' boxes concatenated)."""
        raise NotImplementedError

    def forward(
        self, embedding: Tensor, early: Tensor, boxes: list[Tensor], plane: Tensor | None = None
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Refined boxes (N_i x 4) and their scores (N_i, in [0, 1]), one tensor each per image in the order of
        `boxes`. The score is the predicted chance, calibrated, that the refined box beats the coarse one."""
        refinement = self.forward_stages(embedding, early, boxes, plane)
        counts = [len(b) for b in boxes]
        scores = self.score.probability(refinement.score_logits)
        return list(refinement.stages[-1].split(counts)), list(scores.split(counts))
