"""The box refiner: stored HQ-SAM features of an image + its coarse boxes -> one refined box per coarse box.

Shapes (B images, N_i boxes in image i, K = sum of N_i, C = the encoder's early channels, P = pool):
  embedding  B x 256 x 64 x 64     early  B x C x 64 x 64     boxes  list of N_i x 4 xyxy
Boxes are in encoder-input pixels (the 1024 x 1024 frame; one feature cell is 16 pixels).

`similarity_cascade`: both features are whitened with statistics of the training set (kept as buffers):
with random encoder weights the early feature is ~300x smaller than the embedding, and a few directions
hold most of its variance while the fine detail lives in the weak ones. Each cascade stage samples a
context-enlarged window around the current box from both maps (RoIAlign, P x P) and turns it into cue
maps that do not depend on what the training images look like: the similarity of every position to the
box's own interior and to its surroundings, in each feature, and the strength of local feature change.
Learnt weights see only these cues (and a few learnt channels of the early feature), which is what lets
a refiner trained on a few hundred images generalise instead of memorising them. A small convolutional
net reads the cue maps and each side is placed along the window from a 1-D profile (side-aware boundary
localisation: a distribution over positions, read out as its expectation, that starts at the box's own
sides so an untrained stage is the identity).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align

from pipeline.encoder import EMBEDDING_SHAPE, IMAGE_SIZE

FEATURE_STRIDE = IMAGE_SIZE // EMBEDDING_SHAPE[1]  # encoder-input pixels per feature cell (16)
# Cue maps computed from the two features: (object, background, object - background) similarity for each,
# the inside-the-box mask, and the early feature's local change.
FIXED_CUES = 8


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

    def to_dict(self) -> dict:
        return {**asdict(self), "contexts": list(self.contexts)}

    @classmethod
    def from_dict(cls, values: dict) -> RefinerConfig:
        return cls(**{**values, "contexts": tuple(values["contexts"])})


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

    def forward(self, x: Tensor) -> Tensor:
        centred = x - self.mean[:, None, None]
        return torch.einsum("dc,bchw->bdhw", self.matrix, centred)


def conv_block(in_channels: int, out_channels: int, kernel: int) -> nn.Sequential:
    """Convolution, GroupNorm, ReLU: B x in x H x W -> B x out x H x W."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2),
        nn.GroupNorm(min(8, out_channels), out_channels),
        nn.ReLU(inplace=True),
    )


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
        return self.project(self.norm(early.float()))


def enlarge(boxes: Tensor, context: float, min_side: float) -> Tensor:
    """K x 4 boxes -> K x 4 windows with the same centre, each side `context` times larger (at least min_side)."""
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = ((boxes[:, 2:] - boxes[:, :2]) * context).clamp_min(min_side) / 2
    return torch.cat([centre - half, centre + half], dim=1)


def box_masks(current: Tensor, pool: int, interior: float) -> tuple[Tensor, Tensor]:
    """Soft masks of the box and of its central part on the P x P window grid: (K x P x P, K x P x P).

    current: K x 4 box sides (x0, y0, x1, y1) in window units [0, 1].
    """
    centres = (torch.arange(pool, dtype=current.dtype, device=current.device) + 0.5) / pool
    sharpness = 4.0 * pool  # a ramp about a quarter of a sample wide

    def between(low: Tensor, high: Tensor) -> Tensor:  # K -> K x P
        return torch.sigmoid((centres - low[:, None]) * sharpness) * torch.sigmoid((high[:, None] - centres) * sharpness)

    x0, y0, x1, y1 = current.unbind(dim=1)
    inside = between(y0, y1)[:, :, None] * between(x0, x1)[:, None, :]
    cx, cy, w, h = (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0
    central = between(cy - interior * h, cy + interior * h)[:, :, None] * between(cx - interior * w, cx + interior * w)[:, None, :]
    return inside, central


def prototype_similarity(window: Tensor, unit: Tensor, weights: Tensor) -> Tensor:
    """Cosine similarity of every position to the weighted mean of the window: K x D x P x P (the window and
    its positions normalised to unit length), K x P x P weights -> K x P x P."""
    prototype = (window * weights[:, None]).sum(dim=(2, 3)) / weights.sum(dim=(1, 2)).clamp_min(1e-3)[:, None]
    return (unit * F.normalize(prototype, dim=1)[:, :, None, None]).sum(dim=1)


def window_cues(early: Tensor, embedding: Tensor, current: Tensor, interior: float) -> Tensor:
    """Cue maps of a window: early K x D x P x P, embedding K x 256 x P x P, box K x 4 -> K x FIXED_CUES x P x P."""
    inside, central = box_masks(current, early.shape[-1], interior)
    cues = [inside]
    units = []
    for window in (early, embedding):
        unit = F.normalize(window, dim=1)  # once per window: both similarities (and the change) use it
        units.append(unit)
        to_object = prototype_similarity(window, unit, central)
        to_background = prototype_similarity(window, unit, 1 - inside)
        cues += [to_object, to_background, to_object - to_background]
    unit = units[0]
    change = F.pad((unit[..., :, 1:] - unit[..., :, :-1]).pow(2).sum(dim=1), (0, 1)) + F.pad(
        (unit[..., 1:, :] - unit[..., :-1, :]).pow(2).sum(dim=1), (0, 0, 0, 1)
    )
    return torch.stack([*cues, change], dim=1)


class SideHead(nn.Module):
    """Per-side boundary localisation along one axis of a window of cue features.

    A window (K x width x P x P) is collapsed across the axis (attention weights learnt per position) into
    a profile (K x width x P) along it. 1-D convolutions score each of the P positions as the low side
    (left / top) and the high side (right / bottom); a Gaussian prior centred on the current side (log
    space, spread `prior_width`) is added, so with zero-initialised scores the head returns the current
    box exactly. Each side's position is the expectation over positions, plus a learnt sub-bin offset.
    """

    def __init__(self, width: int, pool: int, prior_width: float, axis: int) -> None:
        super().__init__()
        self.axis = axis  # 3: positions along x (collapse rows), 2: positions along y (collapse columns)
        self.prior_width = prior_width
        self.attention = nn.Conv2d(width, 1, 1)
        groups = min(8, width)
        self.profile = nn.Sequential(
            nn.Conv1d(width, width, 3, padding=1),
            nn.GroupNorm(groups, width),
            nn.ReLU(inplace=True),
            nn.Conv1d(width, width, 3, padding=1),
            nn.GroupNorm(groups, width),
            nn.ReLU(inplace=True),
        )
        self.scores = nn.Conv1d(width, 2, 3, padding=1)  # low side, high side
        self.offsets = nn.Conv1d(width, 2, 3, padding=1)
        for layer in (self.scores, self.offsets):  # start as the identity: the prior alone decides
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.register_buffer("centres", (torch.arange(pool, dtype=torch.float32) + 0.5) / pool)

    def forward(self, window: Tensor, current: Tensor) -> Tensor:
        """window: K x width x P x P; current: K x 2 sides (low, high) in window units -> K x 2 in window units."""
        across = 5 - self.axis  # the other spatial dimension
        weights = self.attention(window).softmax(dim=across)
        features = self.profile((window * weights).sum(dim=across))  # K x width x P
        prior = -((self.centres - current[:, :, None]) ** 2) / (2 * self.prior_width**2)  # K x 2 x P
        probability = (self.scores(features).float() + prior).softmax(dim=-1)
        offsets = torch.tanh(self.offsets(features).float()) / len(self.centres)  # at most one bin either way
        # The window's edges truncate the prior, pulling its mean inwards; shift it back onto the side.
        prior_bias = current - (prior.softmax(dim=-1) * self.centres).sum(dim=-1)
        return (probability * (self.centres + offsets)).sum(dim=-1) + prior_bias


class CascadeStage(nn.Module):
    """One refinement step: projected early map B x dim x 64 x 64, whitened embedding B x 256 x 64 x 64 and
    K boxes (pixels) -> K refined boxes (pixels)."""

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

    def pool_windows(self, feature: Tensor, rois: Tensor) -> Tensor:
        """B x D x 64 x 64 map, K x 5 RoIs (batch index, xyxy pixels) -> K x D x P x P."""
        return roi_align(
            feature, rois.to(feature.dtype), self.pool, spatial_scale=1 / FEATURE_STRIDE, sampling_ratio=2, aligned=True
        )

    def forward(self, early: Tensor, embedding: Tensor, boxes: Tensor, batch_index: Tensor) -> Tensor:
        windows = enlarge(boxes, self.context, self.min_window)
        # roi_align indexes memory with these coordinates and crashes the process on NaN or huge values
        # (a diverged model makes both); a bad box still shows up as NaN in this stage's output and loss.
        safe = windows.nan_to_num(0.0, 0.0, 0.0).clamp(-IMAGE_SIZE, 2 * IMAGE_SIZE)
        rois = torch.cat([batch_index[:, None].to(safe.dtype), safe], dim=1)
        early_window = self.pool_windows(early, rois)
        origin = windows[:, :2].repeat(1, 2)
        size = (windows[:, 2:] - windows[:, :2]).repeat(1, 2)
        current = (boxes - origin) / size  # x0, y0, x1, y1 in window units
        cues = window_cues(early_window.float(), self.pool_windows(embedding, rois).float(), current, self.interior)
        if self.learned is not None:
            cues = torch.cat([cues, self.learned(early_window).to(cues.dtype)], dim=1)
        x = self.net(cues)
        x0, x1 = self.along_x(x, current[:, 0::2]).unbind(dim=1)
        y0, y1 = self.along_y(x, current[:, 1::2]).unbind(dim=1)
        return origin + torch.stack([x0, y0, x1, y1], dim=1) * size


class SimilarityCascadeRefiner(nn.Module):
    """Whiten both features, then refine each box through a cascade of RoIAlign + cue-map + side-aware stages."""

    def __init__(self, config: RefinerConfig) -> None:
        super().__init__()
        self.config = config
        self.early = EarlyProjection(config.early_channels, config.dim, config.trunk)
        self.embedding_norm = Whitening(EMBEDDING_SHAPE[0])
        self.stages = nn.ModuleList(CascadeStage(config, context) for context in config.contexts)

    def set_feature_statistics(self, stats: dict[str, Tensor]) -> None:
        """Install training-set statistics {embedding_mean, embedding_cov, early_mean, early_cov}."""
        self.embedding_norm.set_statistics(stats["embedding_mean"], stats["embedding_cov"])
        self.early.norm.set_statistics(stats["early_mean"], stats["early_cov"])

    def forward_stages(self, embedding: Tensor, early: Tensor, boxes: list[Tensor]) -> list[Tensor]:
        """Every stage's boxes, K x 4 each (all images' boxes concatenated in order), last = final.

        Each stage starts from the previous stage's boxes without gradient through them (as in Cascade
        R-CNN), so every stage learns to refine the distribution of boxes it is actually given.
        """
        projected = self.early(early)
        whitened = self.embedding_norm(embedding.float())
        batch_index = torch.cat(
            [torch.full((len(b),), i, dtype=torch.int64, device=projected.device) for i, b in enumerate(boxes)]
        )
        current = torch.cat(boxes).float()
        outputs = []
        for stage in self.stages:
            current = stage(projected, whitened, current.detach(), batch_index).float()
            outputs.append(current)
        return outputs

    def forward(self, embedding: Tensor, early: Tensor, boxes: list[Tensor]) -> list[Tensor]:
        """Refined boxes, one N_i x 4 tensor per image, in the order of `boxes`."""
        final = self.forward_stages(embedding, early, boxes)[-1]
        return list(final.split([len(b) for b in boxes]))


Builder = Callable[[RefinerConfig], SimilarityCascadeRefiner]
REFINERS: dict[str, Builder] = {"similarity_cascade": SimilarityCascadeRefiner}


def build_refiner(name: str, config: RefinerConfig) -> SimilarityCascadeRefiner:
    """A refiner variant from `REFINERS` by name."""
    if name not in REFINERS:
        raise KeyError(f"unknown refiner {name!r}; choose one of {', '.join(REFINERS)}")
    return REFINERS[name](config)
