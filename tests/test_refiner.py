"""The refiner's building blocks: what an untrained refiner returns, the early feature's whitening, and the cell
weights its cues use."""

from __future__ import annotations

import pytest
import torch

from pipeline.model.plane_stage import PlaneStage
from pipeline.model.base import RefinerConfig
from pipeline.model.registry import build_refiner
from pipeline.model.refiner import EarlyProjection, SideHead, cell_cover, similarity_maps


@pytest.mark.parametrize(
    "plane_pool, plane_width", [(0, 16), (16, 16), (16, 8)], ids=["cascade", "with-fine-stage", "narrow-fine-stage"]
)
def test_an_untrained_refiner_returns_the_boxes_it_is_given(plane_pool: int, plane_width: int) -> None:
    """Each side starts at the current box (zero-initialised scores on the prior): training starts from
    the identity, whatever the features (and planes) and wherever the box lies, even half outside the image."""
    torch.manual_seed(0)
    config = RefinerConfig(early_channels=160, plane_pool=plane_pool, plane_width=plane_width)
    model = build_refiner("similarity_cascade", config).eval()
    assert model.needs_plane == bool(plane_pool)
    boxes = [
        torch.tensor([[100.0, 120.0, 400.0, 300.0], [5.0, 6.0, 20.0, 30.0]]),
        torch.tensor([[900.0, 900.0, 1100.0, 1000.0]]),
    ]
    planes = torch.randint(0, 256, (2, 3, 256, 256), dtype=torch.uint8) if plane_pool else None
    with torch.no_grad():
        refined, scores = model(torch.randn(2, 256, 64, 64), torch.randn(2, 160, 64, 64), boxes, planes)
    for before, after, score in zip(boxes, refined, scores, strict=True):
        torch.testing.assert_close(after, before, atol=1e-3, rtol=0)
        assert score.shape == (len(before),) and ((score >= 0) & (score <= 1)).all()


def test_the_early_projection_whitens_then_projects() -> None:
    """The whitening is folded into the first 1x1 convolution; the result must be that of whitening the
    float16 feature on its own and then running every layer, gradient included."""
    torch.manual_seed(0)
    projection = EarlyProjection(early_channels=12, dim=8, trunk=1)
    raw = torch.randn(500, 12).double() @ torch.randn(12, 12).double() * 0.003 + 0.01  # correlated, small
    projection.norm.set_statistics(raw.mean(dim=0), raw.T.cov(correction=0))
    early = (torch.randn(2, 12, 64, 64) * 0.003 + 0.01).half()

    folded = projection(early)
    unfolded = projection.project(projection.norm(early.float()))

    torch.testing.assert_close(folded, unfolded, atol=1e-4, rtol=1e-4)
    (folded_grad,) = torch.autograd.grad(folded.square().sum(), projection.project[0].weight)
    (unfolded_grad,) = torch.autograd.grad(unfolded.square().sum(), projection.project[0].weight)
    torch.testing.assert_close(folded_grad, unfolded_grad, atol=1e-3, rtol=1e-3)


def test_cell_cover_weighs_cells_by_the_share_a_box_covers() -> None:
    boxes = torch.tensor([[0.0, 0.0, 32.0, 16.0], [8.0, 8.0, 12.0, 24.0], [1000.0, 1000.0, 1100.0, 1100.0]])
    cover = cell_cover(boxes).view(3, 64, 64)
    assert cover[0, 0, :2].tolist() == [1.0, 1.0] and cover[0].sum() == 2.0  # two whole cells
    # 4 x 16 pixels straddling two cell rows: a quarter of a cell's width, half of each row's height.
    assert cover[1, 0, 0] == 0.125 and cover[1, 1, 0] == 0.125 and cover[1].sum() == 0.25
    assert cover[2].sum() == 1.5**2  # only the part inside the 1024 x 1024 frame counts


def test_similarity_maps_compare_every_cell_with_each_boxs_own_region() -> None:
    """Cells that hold the region's feature score 1, others by their cosine to it; boxes use their own image."""
    feature = torch.zeros(2, 3, 64 * 64)
    feature[0, 0] = 1.0  # image 0: every cell is (1, 0, 0) ...
    feature[0, :, :64] = torch.tensor([0.0, 2.0, 0.0])[:, None]  # ... except the top row, (0, 2, 0)
    feature[1, 2] = 5.0  # image 1: every cell is (0, 0, 5)
    regions = torch.zeros(3, 1, 64 * 64)
    regions[0, 0, 64 * 10] = 1.0  # a cell of image 0 below the top row
    regions[1, 0, 3] = 1.0  # a top-row cell of image 0
    regions[2, 0, 100] = 1.0  # a cell of image 1
    unit = torch.nn.functional.normalize(feature, dim=1)
    maps = similarity_maps(feature, unit, regions, counts=[2, 1])
    assert maps.shape == (3, 1, 64, 64)
    assert maps[0, 0, 0].abs().max() < 1e-6 and (maps[0, 0, 1:] - 1).abs().max() < 1e-6
    assert (maps[1, 0, 0] - 1).abs().max() < 1e-6 and maps[1, 0, 1:].abs().max() < 1e-6
    assert (maps[2] - 1).abs().max() < 1e-6


def test_the_mode_readout_keeps_a_second_mode_from_pulling_a_side_between_the_two() -> None:
    head = SideHead(width=8, pool=24, prior_width=0.5, axis=3)
    probability = torch.zeros(1, 2, 24)
    probability[0, :, 3], probability[0, :, 15] = 0.6, 0.4  # the side's edge, and a neighbour's
    centres = head.centres
    assert (head._readout_weights(probability) * centres).sum(-1)[0, 0] == pytest.approx(
        (0.6 * 3 + 0.4 * 15 + 0.5) / 24
    )
    head.mode_window = 2
    assert (head._readout_weights(probability) * centres).sum(-1)[0, 0] == pytest.approx(3.5 / 24)
    head.mode_window = 12
    assert head._readout_weights(probability).sum(-1).allclose(torch.ones(1, 2))


def test_the_fine_stage_moves_a_side_onto_the_edge_the_plane_shows() -> None:
    """Trained on one image for a few steps, the fine stage alone (no feature cues can place a side below
    the 16-px cell) brings a box whose sides are 4 px off the square the plane shows to within 2 px on average."""
    torch.manual_seed(0)
    stage = PlaneStage(width=8, pool=48, context=1.3, min_window=24.0, prior_width=0.06, interior=0.3)
    plane = torch.full((1, 3, 256, 256), 40, dtype=torch.uint8)
    plane[:, :, 50:100, 60:120] = 200  # a square at x 240..480, y 200..400 in encoder-input pixels
    truth = torch.tensor([[240.0, 200.0, 480.0, 400.0]])
    offsets = torch.tensor([[6.0, -6.0, -6.0, 6.0], [-6.0, 6.0, 6.0, -6.0], [6.0, 6.0, -6.0, -6.0]])
    coarse = truth + offsets
    index = torch.zeros(len(coarse), dtype=torch.int64)
    optimizer = torch.optim.Adam(stage.parameters(), lr=1e-2)
    for _ in range(100):
        loss = (stage(plane, coarse, index).boxes - truth).abs().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        placed = stage(plane, torch.tensor([[244.0, 196.0, 476.0, 404.0]]), index[:1]).boxes
    assert (placed - truth).abs().mean() < 2.0 and (placed - truth).abs().max() < 4.0, placed
