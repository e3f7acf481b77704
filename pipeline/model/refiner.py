"""The box refiner: stored HQ-SAM features of an image + its coarse boxes -> one refined box per coarse box.

Shapes (B images, N_i boxes in image i, K = sum of N_i, C = the encoder's early channels, P = pool):
  embedding  B x 256 x 64 x 64     early  B x C x 64 x 64     boxes  list of N_i x 4 xyxy
Boxes are in encoder-input pixels (the 1024 x 1024 frame; one feature cell is 16 pixels).

`similarity_cascade`: both features are whitened with statistics of the training set (kept as buffers):
with random encoder weights the early feature is ~300x smaller than the embedding, and a few directions
hold most of its variance while the fine detail lives in the weak ones. Each cascade stage turns them
into cue maps that do not depend on what the training images look like, computed once per cell of the
64 x 64 feature grid: the similarity of every cell to the box's own interior and to its surroundings, in
each feature, and the strength of local feature change. Only these few maps are sampled (RoIAlign, P x P)
over a context-enlarged window around the current box, which keeps a training step cheap next to pooling
every feature channel into every window. Learnt weights see only these cues (and a few learnt channels
of the early feature), which is what lets a refiner trained on a few hundred images generalise instead
of memorising them. A small convolutional net reads the cue maps and each side is placed along the
window from a 1-D profile (side-aware boundary localisation: a distribution over positions, read out as
its expectation, that starts at the box's own sides so an untrained stage is the identity).
With `plane_pool` set, a fine stage (`pipeline.model.plane_stage`) then moves each side on the entry's stride-4
image plane (B x 3 x 256 x 256 uint8), below the 16-px cell.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align

from pipeline.model.base import Refiner, RefinerConfig, Refinement
from pipeline.model.plane_stage import PlaneStage
from pipeline.model.score import BoxScore
from pipeline.model.refiner_parts import SideHead, StageOutput, conv_block, enlarge, inside_mask, place_sides
from pipeline.shapes import EMBEDDING_SHAPE, FEATURE_STRIDE, IMAGE_SIZE

# Cue maps computed from the two features: (object, background, object - background) similarity for each,
# the inside-the-box mask, and the early feature's local change.
FIXED_CUES = 8


class Whitening(nn.Module):
    """x -> M (x - mean) over channels with fixed statistics (buffers, saved with the model). B x C x H x W.

    M standardises each channel, then decorrelates the channels (ZCA on the correlation matrix, with
    `epsilon` added to its eigenvalues so that near-empty directions are not blown up into noise).
    Until statistics are installed it is the identity.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("matrix", torch.eye(channels))

    def set_statistics(self, mean: Tensor, covariance: Tensor, epsilon: float = 0.01) -> None:
        """Install the channel mean (C,) and covariance (C x C) measured on the training set."""
        covariance = covariance.double()
        std = covariance.diagonal().clamp_min(0).sqrt()
        std = torch.where(std > 0, std, torch.ones_like(std))  # a dead channel stays as it is
        correlation = covariance / std[:, None] / std[None, :]
        eigenvalues, eigenvectors = torch.linalg.eigh(correlation)
        scale = (eigenvalues.clamp_min(0) + epsilon).rsqrt()
        zca = eigenvectors @ torch.diag(scale) @ eigenvectors.T
        self.mean.copy_(mean)
        self.matrix.copy_((zca / std[None, :]).float())

    def centre(self, x: Tensor) -> Tensor:
        """x - mean, float32 whatever x's dtype (the subtraction upcasts: no separate copy)."""
        return x - self.mean[:, None, None]

    def forward(self, x: Tensor) -> Tensor:
        return (self.matrix @ self.centre(x).flatten(2)).view_as(x)  # a batched matmul without einsum's permute copy


class EarlyProjection(nn.Module):
    """Whiten the early feature, project it and add local context: B x C x 64 x 64 -> B x dim x 64 x 64."""

    def __init__(self, early_channels: int, dim: int, trunk: int) -> None:
        super().__init__()
        self.norm = Whitening(early_channels)
        layers: list[nn.Module] = [nn.Conv2d(early_channels, dim, 1)]
        for _ in range(trunk):
            layers += [nn.GELU(), nn.Conv2d(dim, dim, 3, padding=1)]
        self.project = nn.Sequential(*layers)

    def forward(self, early: Tensor) -> Tensor:
        reduce = self.project[0]
        # The whitening is linear, so it folds into the first 1x1 convolution: no C x C pass over the map.
        weight = reduce.weight.flatten(1) @ self.norm.matrix
        return self.project[1:](F.conv2d(self.norm.centre(early), weight[:, :, None, None], reduce.bias))


def cell_cover(boxes: Tensor) -> Tensor:
    """The share of each feature cell a box covers: K x 4 xyxy pixels -> K x (64 * 64), exact, so even a box
    smaller than a cell gets weight on the cells it touches."""
    cells = torch.arange(EMBEDDING_SHAPE[1], dtype=boxes.dtype, device=boxes.device)
    x0, y0, x1, y1 = (boxes / FEATURE_STRIDE).unbind(dim=1)

    def along(low: Tensor, high: Tensor) -> Tensor:  # K -> K x 64
        return (torch.minimum(high[:, None], cells + 1) - torch.maximum(low[:, None], cells)).clamp(0, 1)

    return (along(y0, y1)[:, :, None] * along(x0, x1)[:, None, :]).flatten(1)


def similarity_maps(feature: Tensor, unit: Tensor, regions: Tensor, counts: list[int]) -> Tensor:
    """Cosine similarity of every cell to the mean feature of each box's regions.

    feature: B x D x (64 * 64), unit: the same normalised per cell, regions: K x R x (64 * 64) cell weights
    (the boxes of image 0 first, `counts` per image) -> K x R x 64 x 64.
    """
    maps = []
    # Iterating unbinds the batch in one op: indexing feature[image] would cost a full-size zero gradient each.
    for weights, image_feature, image_unit in zip(regions.split(counts), feature, unit, strict=True):
        mean = weights @ image_feature.T / weights.sum(dim=-1, keepdim=True).clamp_min(1e-3)  # N x R x D
        maps.append(F.normalize(mean, dim=-1) @ image_unit)
    side = EMBEDDING_SHAPE[1]
    return torch.cat(maps).unflatten(-1, (side, side))


def local_change(unit: Tensor) -> Tensor:
    """How much a normalised feature map changes to the next cell right and below: B x D x H x W -> B x 1 x H x W."""
    across = F.pad((unit[..., :, 1:] - unit[..., :, :-1]).pow(2).sum(dim=1), (0, 1))
    down = F.pad((unit[..., 1:, :] - unit[..., :-1, :]).pow(2).sum(dim=1), (0, 0, 0, 1))
    return (across + down)[:, None]


@dataclass
class CellMaps:
    """What every cascade stage reads, computed once per batch on the 64 x 64 feature grid."""

    early: Tensor  # B x dim x 64 x 64: the projected early feature
    flat: tuple[Tensor, Tensor]  # early, whitened embedding: B x D x (64 * 64) each
    unit: tuple[Tensor, Tensor]  # the same, normalised per cell
    change: Tensor  # B x 1 x 64 x 64: local change of the early feature


class CascadeStage(nn.Module):
    """One refinement step: the batch's CellMaps and K boxes (pixels) -> K refined boxes (pixels), and what
    the score reads of the step (`StageOutput`)."""

    def __init__(self, config: RefinerConfig, context: float) -> None:
        super().__init__()
        self.pool = config.pool
        self.context = context
        self.min_window = config.min_window
        self.interior = config.interior
        self.learned = nn.Conv2d(config.dim, config.learned, 1) if config.learned else None
        self.net = nn.Sequential(
            conv_block(FIXED_CUES + config.learned, config.width, 3),
            conv_block(config.width, config.width, 3),
            conv_block(config.width, config.width, 3),
        )
        self.along_x = SideHead(config.width, config.pool, config.prior_width, axis=3)
        self.along_y = SideHead(config.width, config.pool, config.prior_width, axis=2)

    def pool_windows(self, maps: Tensor, index: Tensor, windows: Tensor) -> Tensor:
        """N x C x 64 x 64 maps, K map indices, K x 4 windows (pixels) -> K x C x P x P."""
        rois = torch.cat([index[:, None].to(windows.dtype), windows], dim=1).to(maps.dtype)
        return roi_align(maps, rois, self.pool, spatial_scale=1 / FEATURE_STRIDE, sampling_ratio=2, aligned=True)

    def forward(self, maps: CellMaps, boxes: Tensor, batch_index: Tensor, counts: list[int]) -> StageOutput:
        windows = enlarge(boxes, self.context, self.min_window)
        # roi_align indexes memory with these coordinates and crashes the process on NaN or huge values
        # (a diverged model makes both); a bad box still shows up as NaN in this stage's output and loss.
        safe_windows, safe_boxes = (
            b.nan_to_num(0.0, 0.0, 0.0).clamp(-IMAGE_SIZE, 2 * IMAGE_SIZE) for b in (windows, boxes)
        )
        # Similarities are computed once per cell of the feature grid; only these few maps are then sampled
        # into each window (far cheaper than pooling every feature channel into every window).
        inside = cell_cover(safe_boxes)
        central = cell_cover(enlarge(safe_boxes, 2 * self.interior, 0.0))
        regions = torch.stack([central, cell_cover(safe_windows) * (1 - inside)], dim=1)  # K x 2 x (64 * 64)
        similarity = torch.cat(
            [similarity_maps(f, u, regions, counts) for f, u in zip(maps.flat, maps.unit, strict=True)], dim=1
        )
        own_map = torch.arange(len(boxes), device=boxes.device)
        early_object, early_background, embedding_object, embedding_background = self.pool_windows(
            similarity, own_map, safe_windows
        ).unbind(dim=1)
        image_maps = maps.change if self.learned is None else torch.cat([maps.change, self.learned(maps.early)], dim=1)
        pooled = self.pool_windows(image_maps, batch_index, safe_windows)
        origin = windows[:, :2].repeat(1, 2)
        size = (windows[:, 2:] - windows[:, :2]).repeat(1, 2)
        current = (boxes - origin) / size  # x0, y0, x1, y1 in window units
        cues = torch.stack(
            [
                inside_mask(current, self.pool),
                early_object,
                early_background,
                early_object - early_background,
                embedding_object,
                embedding_background,
                embedding_object - embedding_background,
            ],
            dim=1,
        )
        x = self.net(torch.cat([cues, pooled], dim=1))
        return place_sides(self.along_x, self.along_y, x, current, origin, size)


class SimilarityCascadeRefiner(Refiner):
    """Whiten both features, then refine each box through a cascade of cue-map + side-aware stages."""

    def __init__(self, config: RefinerConfig) -> None:
        super().__init__()
        self.config = config
        self.early = EarlyProjection(config.early_channels, config.dim, config.trunk)
        self.embedding_norm = Whitening(EMBEDDING_SHAPE[0])
        self.stages = nn.ModuleList(CascadeStage(config, context) for context in config.contexts)
        self.fine = (
            PlaneStage(
                config.plane_width,
                config.plane_pool,
                config.plane_context,
                config.min_window / 2,
                config.plane_prior_width,
                config.interior,
            )
            if config.plane_pool
            else None
        )
        # Each stage's evidence: its net's pooled mean and max (2 x its width), each side's spread and move (8).
        evidence = len(config.contexts) * (2 * config.width + 8) + (2 * config.plane_width + 8 if self.fine else 0)
        self.score = BoxScore(evidence + 2)  # and the coarse box's size

    @property
    def needs_plane(self) -> bool:
        """Whether this refiner reads the stride-4 image plane of each entry (its fine stage)."""
        return self.fine is not None

    def set_feature_statistics(self, stats: dict[str, Tensor]) -> None:
        """Install training-set statistics {embedding_mean, embedding_cov, early_mean, early_cov}."""
        self.embedding_norm.set_statistics(stats["embedding_mean"], stats["embedding_cov"])
        self.early.norm.set_statistics(stats["early_mean"], stats["early_cov"])

    def cell_maps(self, embedding: Tensor, early: Tensor) -> CellMaps:
        """B x 256 x 64 x 64 embedding, B x C x 64 x 64 early feature -> what the stages read."""
        projected = self.early(early)
        flat = (projected.flatten(2), self.embedding_norm(embedding).flatten(2))
        unit = tuple(F.normalize(f, dim=1) for f in flat)
        return CellMaps(projected, flat, unit, local_change(unit[0].unflatten(-1, projected.shape[-2:])))

    def forward_stages(
        self, embedding: Tensor, early: Tensor, boxes: list[Tensor], plane: Tensor | None = None
    ) -> Refinement:
        """Every stage's boxes and the score logits of the final ones (all images' boxes concatenated).

        plane: B x 3 x 256 x 256 uint8, the entries' stride-4 planes; needed when `needs_plane`.

        Each stage starts from the previous stage's boxes without gradient through them (as in Cascade
        R-CNN), so every stage learns to refine the distribution of boxes it is actually given.
        """
        maps = self.cell_maps(embedding, early)
        counts = [len(b) for b in boxes]
        batch_index = torch.cat(
            [torch.full((n,), i, dtype=torch.int64, device=maps.early.device) for i, n in enumerate(counts)]
        )
        coarse = torch.cat(boxes).float()
        current = coarse
        outputs, evidence = [], []
        for stage in self.stages:
            step = stage(maps, current.detach(), batch_index, counts)
            current = step.boxes.float()
            outputs.append(current)
            evidence.append(step.evidence)
        if self.fine is not None:
            if plane is None:
                raise ValueError("this refiner's fine stage needs the entries' stride-4 planes")
            step = self.fine(plane, current.detach(), batch_index)
            current = step.boxes.float()
            outputs.append(current)
            evidence.append(step.evidence)
        # Small boxes are harder: the head also sees the coarse box's size (log, in units of the 1024 frame).
        size = (coarse[:, 2:] - coarse[:, :2]).clamp_min(1.0) / IMAGE_SIZE
        features = torch.cat([*evidence, size.log()], dim=1).float()
        return Refinement(outputs, features, self.score(features), step.spread.float())
