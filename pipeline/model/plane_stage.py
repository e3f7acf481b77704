"""The fine stage of the refiner: each side placed on the stride-4 image plane stored beside the features.

Shapes (B images, K boxes over the batch, P = the stage's pool):
  plane  B x 3 x 256 x 256 uint8 (the encoder input averaged over 4 x 4 pixels)     boxes  K x 4 xyxy pixels

The 64 x 64 feature grid cannot place a side better than the 16-px cell it falls in (`bench/cell_oracle.py`);
the stride-4 plane holds where inside the cell the outline runs (`bench/subcell_probe.py`). This stage reads
only cues that do not depend on what the training images look like, in a window a little larger than the
box the cascade gave: the window's colours standardised, their distance to the box interior's mean colour and
to the surroundings' mean colour, and the local colour change. A small net reads them and `SideHead` moves
each side within a narrow prior around the cascade's side: the cascade says which object, this stage where
its outline is.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.ops import roi_align

from pipeline.model.refiner_parts import SideHead, StageOutput, conv_block, enlarge, inside_mask, place_sides
from pipeline.shapes import IMAGE_SIZE, PLANE_STRIDE

# inside mask, 3 standardised colours, distance to the object's and to the surroundings' colour, their
# difference, colour change
PLANE_CUES = 8


def masked_mean(values: Tensor, weights: Tensor) -> Tensor:
    """K x C x P x P values, K x P x P weights -> K x C x 1 x 1 weighted means."""
    total = weights.sum(dim=(1, 2)).clamp_min(1e-3)[:, None]
    return ((values * weights[:, None]).sum(dim=(2, 3)) / total)[:, :, None, None]


class PlaneStage(nn.Module):
    """K boxes (pixels) and the batch's planes -> K boxes placed on the plane, and what the score head reads."""

    def __init__(
        self, width: int, pool: int, context: float, min_window: float, prior_width: float, interior: float
    ) -> None:
        super().__init__()
        self.pool = pool
        self.context = context
        self.min_window = min_window
        self.interior = interior
        self.net = nn.Sequential(
            conv_block(PLANE_CUES, width, 3),
            conv_block(width, width, 3),
            conv_block(width, width, 3),
        )
        self.along_x = SideHead(width, pool, prior_width, axis=3)
        self.along_y = SideHead(width, pool, prior_width, axis=2)

    def cues(self, plane: Tensor, boxes: Tensor, batch_index: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The cue windows (K x PLANE_CUES x P x P), the boxes' sides in window units (K x 4) and each
        window's origin and size (K x 4 each, pixels, repeated for x0, y0, x1, y1)."""
        windows = enlarge(boxes, self.context, self.min_window)
        safe = windows.nan_to_num(0.0, 0.0, 0.0).clamp(-IMAGE_SIZE, 2 * IMAGE_SIZE)  # see CascadeStage.forward
        rois = torch.cat([batch_index[:, None].to(safe.dtype), safe], dim=1)
        colours = roi_align(plane.float() / 255.0, rois.float(), self.pool, 1 / PLANE_STRIDE, 2, aligned=True)
        origin = windows[:, :2].repeat(1, 2)
        size = (windows[:, 2:] - windows[:, :2]).repeat(1, 2)
        current = (boxes - origin) / size
        # Standardised per window: the cues say how colours differ here, not what colour things are.
        mean = colours.mean(dim=(1, 2, 3), keepdim=True)
        spread = colours.std(dim=(1, 2, 3), keepdim=True).clamp_min(0.02)
        colours = (colours - mean) / spread
        inside = inside_mask(current, self.pool)
        centre = (current[:, :2] + current[:, 2:]) / 2
        half = (current[:, 2:] - current[:, :2]) * self.interior
        central = inside_mask(torch.cat([centre - half, centre + half], dim=1), self.pool)
        to_object = (colours - masked_mean(colours, central)).norm(dim=1)
        to_background = (colours - masked_mean(colours, 1 - inside)).norm(dim=1)
        across = nn.functional.pad((colours[..., :, 1:] - colours[..., :, :-1]).norm(dim=1), (0, 1))
        down = nn.functional.pad((colours[..., 1:, :] - colours[..., :-1, :]).norm(dim=1), (0, 0, 0, 1))
        maps = [inside, *colours.unbind(dim=1), to_object, to_background, to_background - to_object, across + down]
        return torch.stack(maps, dim=1), current, origin, size

    def forward(self, plane: Tensor, boxes: Tensor, batch_index: Tensor) -> StageOutput:
        cues, current, origin, size = self.cues(plane, boxes, batch_index)
        x = self.net(cues)
        return place_sides(self.along_x, self.along_y, x, current, origin, size)
