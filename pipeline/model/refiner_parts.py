"""Parts every refiner stage is built of: windows around boxes, the soft box mask, a conv block, and the
side head that places each side from a 1-D profile of a window; and what a stage returns (`StageOutput`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


def conv_block(in_channels: int, out_channels: int, kernel: int) -> nn.Sequential:
    """Convolution, GroupNorm, ReLU: B x in x H x W -> B x out x H x W."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2),
        nn.GroupNorm(min(8, out_channels), out_channels),
        nn.ReLU(inplace=True),
    )


def enlarge(boxes: Tensor, context: float, min_side: float) -> Tensor:
    """K x 4 boxes -> K x 4 windows with the same centre, each side `context` times as long (at least min_side)."""
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = ((boxes[:, 2:] - boxes[:, :2]) * context).clamp_min(min_side) / 2
    return torch.cat([centre - half, centre + half], dim=1)


def inside_mask(current: Tensor, pool: int) -> Tensor:
    """Soft mask of the box on the P x P window grid: K x 4 sides (x0, y0, x1, y1) in window units -> K x P x P."""
    centres = (torch.arange(pool, dtype=current.dtype, device=current.device) + 0.5) / pool
    sharpness = 4.0 * pool  # a ramp about a quarter of a sample wide

    def between(low: Tensor, high: Tensor) -> Tensor:  # K -> K x P
        return torch.sigmoid((centres - low[:, None]) * sharpness) * torch.sigmoid(
            (high[:, None] - centres) * sharpness
        )

    x0, y0, x1, y1 = current.unbind(dim=1)
    return between(y0, y1)[:, :, None] * between(x0, x1)[:, None, :]


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
        # None: each side is the expectation over all positions (as trained). k: over the k positions either
        # side of the most probable one, so that a second mode (a neighbour's edge) does not pull the side
        # between the two (`bench/side_readout.py` measures it).
        self.mode_window: int | None = None

    def forward(self, window: Tensor, current: Tensor) -> tuple[Tensor, Tensor]:
        """window: K x width x P x P; current: K x 2 sides (low, high) in window units -> the sides (K x 2,
        window units) and the spread of each side's distribution (K x 2 standard deviations, window units)."""
        across = 5 - self.axis  # the other spatial dimension
        weights = self.attention(window).softmax(dim=across)
        features = self.profile((window * weights).sum(dim=across))  # K x width x P
        prior = -((self.centres - current[:, :, None]) ** 2) / (2 * self.prior_width**2)  # K x 2 x P
        probability = (self.scores(features).float() + prior).softmax(dim=-1)
        offsets = torch.tanh(self.offsets(features).float()) / len(self.centres)  # at most one bin either way
        # The window's edges truncate the prior, pulling its mean inwards; shift it back onto the side.
        prior_bias = current - (prior.softmax(dim=-1) * self.centres).sum(dim=-1)
        mean = (probability * self.centres).sum(dim=-1)
        spread = (probability * (self.centres - mean[:, :, None]) ** 2).sum(dim=-1).clamp_min(0).sqrt()
        return (self._readout_weights(probability) * (self.centres + offsets)).sum(dim=-1) + prior_bias, spread

    def _readout_weights(self, probability: Tensor) -> Tensor:
        """K x 2 x P side distributions -> the weights each side's position is read with (summing to 1)."""
        if self.mode_window is None:
            return probability
        bins = torch.arange(probability.shape[-1], device=probability.device)
        near = (bins - probability.argmax(dim=-1, keepdim=True)).abs() <= self.mode_window
        weights = probability * near
        return weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-12)


@dataclass
class StageOutput:
    """What one cascade stage gives: its boxes and the evidence the score head reads about them."""

    boxes: Tensor  # K x 4 pixels
    spread: Tensor  # K x 4: the standard deviation of each side's distribution (x0, y0, x1, y1; window units)
    evidence: Tensor  # K x (2 * width + 8): the net's pooled features, each side's spread and move (window units)


def place_sides(
    along_x: SideHead, along_y: SideHead, x: Tensor, current: Tensor, origin: Tensor, size: Tensor
) -> StageOutput:
    """A stage's net output (K x width x P x P) and its boxes in window units (K x 4) -> the stage's output:
    the sides each head places (pixels, through the windows' origin and size, K x 4 each), their spreads,
    and the evidence the score head reads (the net's pooled features, each side's spread and move)."""
    sides_x, spread_x = along_x(x, current[:, 0::2])
    sides_y, spread_y = along_y(x, current[:, 1::2])
    sides = torch.stack([sides_x[:, 0], sides_y[:, 0], sides_x[:, 1], sides_y[:, 1]], dim=1)
    spread = torch.stack([spread_x[:, 0], spread_y[:, 0], spread_x[:, 1], spread_y[:, 1]], dim=1)
    evidence = torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1).float()
    return StageOutput(origin + sides * size, spread, torch.cat([evidence, spread, sides - current], dim=1))
