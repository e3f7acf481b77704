"""The box refiner: stored HQ-SAM features of an image + its coarse boxes -> one refined box per coarse box.

Shapes (B images, N_i boxes in image i, K = sum of N_i, C = the encoder's early channels):
  embedding  B x 256 x 64 x 64     early  B x C x 64 x 64     boxes  list of N_i x 4 xyxy
Boxes are in encoder-input pixels (the 1024 x 1024 frame; one feature cell is 16 pixels).

`roi_cascade`: the early feature (and, if configured, the embedding) is whitened with statistics of the
training set, kept as buffers: with random encoder weights the early feature is ~300x smaller than the
embedding, and two directions hold two thirds of its variance while the fine detail lives in the weak
ones. A 1x1 convolution and a small convolutional trunk on the 64 x 64 grid follow;
then each cascade stage pools a context-enlarged window around the current box with RoIAlign and
predicts each side's position along that window from a 1-D profile of the window (side-aware boundary
localisation: a distribution over positions, read out as its expectation, that starts at the box's own
sides so an untrained stage is the identity).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import Tensor, nn
from torchvision.ops import roi_align

from pipeline.encoder import EMBEDDING_SHAPE, IMAGE_SIZE

FEATURE_STRIDE = IMAGE_SIZE // EMBEDDING_SHAPE[1]  # encoder-input pixels per feature cell (16)


@dataclass(frozen=True)
class RefinerConfig:
    """Hyper-parameters of a refiner; stored in checkpoints as a plain dict."""

    early_channels: int
    width: int = 32  # channels of the fused feature map and of each stage
    trunk: int = 2  # 3x3 convolutions on the fused 64 x 64 map (context for edges: 16 px cells are coarse)
    pool: int = 16  # RoIAlign output size (pool x pool samples over the enlarged window)
    contexts: tuple[float, ...] = (2.0, 1.5)  # window size / box size, one per cascade stage
    min_window: float = 48.0  # smallest window side in pixels: tiny boxes still see their surroundings
    prior_width: float = 0.1  # spread (window units) of each side's prior around the current side
    # Fuse the 256-channel embedding too. Off by default: measured on the demo (random-init vit_tiny) it
    # only helps the model memorise the training images (val mean IoU 0.711 with it, 0.736 without).
    use_embedding: bool = False

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
        nn.GroupNorm(8, out_channels),
        nn.ReLU(inplace=True),
    )


class FeatureFusion(nn.Module):
    """Whiten the maps, fuse them and add local context: (B x 256 x 64 x 64, B x C x 64 x 64) -> B x width x 64 x 64.

    Without `use_embedding` only the early feature is used (the embedding is accepted and ignored).
    """

    def __init__(self, early_channels: int, width: int, trunk: int, use_embedding: bool) -> None:
        super().__init__()
        self.embedding_norm = Whitening(EMBEDDING_SHAPE[0]) if use_embedding else None
        self.early_norm = Whitening(early_channels)
        self.project = conv_block(early_channels + (EMBEDDING_SHAPE[0] if use_embedding else 0), width, 1)
        self.trunk = nn.Sequential(*(conv_block(width, width, 3) for _ in range(trunk)))

    def forward(self, embedding: Tensor, early: Tensor) -> Tensor:
        x = self.early_norm(early.float())
        if self.embedding_norm is not None:
            x = torch.cat([self.embedding_norm(embedding.float()), x], dim=1)
        return self.trunk(self.project(x))


def enlarge(boxes: Tensor, context: float, min_side: float) -> Tensor:
    """K x 4 boxes -> K x 4 windows with the same centre, each side `context` times larger (at least min_side)."""
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = ((boxes[:, 2:] - boxes[:, :2]) * context).clamp_min(min_side) / 2
    return torch.cat([centre - half, centre + half], dim=1)


class SideHead(nn.Module):
    """Per-side boundary localisation along one axis of a pooled window.

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
        self.profile = nn.Sequential(
            nn.Conv1d(width, width, 3, padding=1),
            nn.GroupNorm(8, width),
            nn.ReLU(inplace=True),
            nn.Conv1d(width, width, 3, padding=1),
            nn.GroupNorm(8, width),
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
    """One refinement step: fused map B x width x 64 x 64 + K boxes (pixels) -> K refined boxes (pixels)."""

    def __init__(self, width: int, pool: int, context: float, min_window: float, prior_width: float) -> None:
        super().__init__()
        self.pool = pool
        self.context = context
        self.min_window = min_window
        self.along_x = SideHead(width, pool, prior_width, axis=3)
        self.along_y = SideHead(width, pool, prior_width, axis=2)

    def forward(self, fused: Tensor, boxes: Tensor, batch_index: Tensor) -> Tensor:
        windows = enlarge(boxes, self.context, self.min_window)
        # roi_align indexes memory with these coordinates and crashes the process on NaN or huge values
        # (a diverged model makes both); a bad box still shows up as NaN in this stage's output and loss.
        safe = windows.nan_to_num(0.0, 0.0, 0.0).clamp(-IMAGE_SIZE, 2 * IMAGE_SIZE)
        rois = torch.cat([batch_index[:, None].to(safe.dtype), safe], dim=1)
        pooled = roi_align(
            fused, rois.to(fused.dtype), self.pool, spatial_scale=1 / FEATURE_STRIDE, sampling_ratio=2, aligned=True
        )
        origin = windows[:, :2].repeat(1, 2)
        size = (windows[:, 2:] - windows[:, :2]).repeat(1, 2)
        current = (boxes - origin) / size  # x0, y0, x1, y1 in window units
        x0, x1 = self.along_x(pooled, current[:, 0::2]).unbind(dim=1)
        y0, y1 = self.along_y(pooled, current[:, 1::2]).unbind(dim=1)
        return origin + torch.stack([x0, y0, x1, y1], dim=1) * size


class RoICascadeRefiner(nn.Module):
    """Fuse both features, then refine each box through a cascade of RoIAlign + side-aware stages."""

    def __init__(self, config: RefinerConfig) -> None:
        super().__init__()
        self.config = config
        self.fusion = FeatureFusion(config.early_channels, config.width, config.trunk, config.use_embedding)
        self.stages = nn.ModuleList(
            CascadeStage(config.width, config.pool, context, config.min_window, config.prior_width)
            for context in config.contexts
        )

    def set_feature_statistics(self, stats: dict[str, Tensor]) -> None:
        """Install training-set statistics {embedding_mean, embedding_cov, early_mean, early_cov}."""
        if self.fusion.embedding_norm is not None:
            self.fusion.embedding_norm.set_statistics(stats["embedding_mean"], stats["embedding_cov"])
        self.fusion.early_norm.set_statistics(stats["early_mean"], stats["early_cov"])

    def forward_stages(self, embedding: Tensor, early: Tensor, boxes: list[Tensor]) -> list[Tensor]:
        """Every stage's boxes, K x 4 each (all images' boxes concatenated in order), last = final.

        Each stage starts from the previous stage's boxes without gradient through them (as in Cascade
        R-CNN), so every stage learns to refine the distribution of boxes it is actually given.
        """
        fused = self.fusion(embedding, early)
        batch_index = torch.cat(
            [torch.full((len(b),), i, dtype=torch.int64, device=fused.device) for i, b in enumerate(boxes)]
        )
        current = torch.cat(boxes).float()
        outputs = []
        for stage in self.stages:
            current = stage(fused, current.detach(), batch_index).float()
            outputs.append(current)
        return outputs

    def forward(self, embedding: Tensor, early: Tensor, boxes: list[Tensor]) -> list[Tensor]:
        """Refined boxes, one N_i x 4 tensor per image, in the order of `boxes`."""
        final = self.forward_stages(embedding, early, boxes)[-1]
        return list(final.split([len(b) for b in boxes]))


Builder = Callable[[RefinerConfig], RoICascadeRefiner]
REFINERS: dict[str, Builder] = {"roi_cascade": RoICascadeRefiner}


def build_refiner(name: str, config: RefinerConfig) -> RoICascadeRefiner:
    """A refiner variant from `REFINERS` by name."""
    if name not in REFINERS:
        raise KeyError(f"unknown refiner {name!r}; choose one of {', '.join(REFINERS)}")
    return REFINERS[name](config)
