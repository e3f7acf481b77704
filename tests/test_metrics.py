"""Box metrics, COCO AP and overlays: hand-computed cases and properties that hold for any boxes."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torchvision.ops import box_iou

from pipeline import metrics
from pipeline.errors import RefineError
from pipeline.figures import BoxFigures, Interval
from pipeline.metrics import box_metrics, coco_ap, paired_iou, write_metrics
from pipeline.inference.overlays import COARSE_COLOUR, GT_COLOUR, REFINED_COLOUR, draw_overlay, save_overlays

GROUP_KEYS = {"count", "mean_iou_coarse", "mean_iou_refined", "share_improved", "share_worse", "recall_at_iou"}


def boxes(*rows: tuple[float, float, float, float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 4)


# --- box_metrics: hand-computed ---------------------------------------------------------------------------


def test_identical_boxes_have_iou_one():
    gt = boxes((0, 0, 10, 10), (5, 5, 50, 80), (100, 20, 400, 300))
    result = box_metrics(gt, gt.clone(), gt.clone())
    assert result["count"] == 3
    assert result["mean_iou_coarse"] == pytest.approx(1.0)
    assert result["mean_iou_refined"] == pytest.approx(1.0)
    assert result["share_improved"] == 0.0 and result["share_worse"] == 0.0
    assert result["recall_at_iou"] == {k: {"0.5": 1.0, "0.75": 1.0, "0.9": 1.0} for k in ("coarse", "refined")}


def test_shares_and_recall_on_a_constructed_example():
    gt = boxes(*[(0, 0, 10, 10)] * 4)
    # IoU with gt is width / 10 for a box (0, 0, width, 10).
    coarse = boxes((0, 0, 5, 10), (0, 0, 10, 10), (0, 0, 8, 10), (0, 0, 10, 10))  # 0.5, 1, 0.8, 1
    refined = boxes((0, 0, 9, 10), (0, 0, 10, 10), (0, 0, 6, 10), (0, 0, 10 - 1e-5, 10))  # 0.9, 1, 0.6, ~1
    result = box_metrics(gt, coarse, refined)
    assert result["count"] == 4
    assert result["mean_iou_coarse"] == pytest.approx((0.5 + 1 + 0.8 + 1) / 4)
    assert result["mean_iou_refined"] == pytest.approx((0.9 + 1 + 0.6 + 1) / 4, abs=1e-6)
    # The last box moved its IoU by 1e-6, below CHANGE_EPS: neither improved nor worse.
    assert result["share_improved"] == 0.25
    assert result["share_worse"] == 0.25
    # IoU exactly at a threshold counts (>=).
    assert result["recall_at_iou"]["coarse"] == {"0.5": 1.0, "0.75": 0.75, "0.9": 0.5}
    assert result["recall_at_iou"]["refined"] == {"0.5": 1.0, "0.75": 0.75, "0.9": 0.75}


def test_size_buckets_split_at_the_coco_thresholds():
    gt = boxes(*[(0, 0, 10, 10)] * 5)
    coarse = boxes(*[(0, 0, 5, 10)] * 5)
    areas = torch.tensor([32.0**2 - 1, 32.0**2, 96.0**2 - 1, 96.0**2, 1e6])
    result = box_metrics(gt, coarse, gt, areas)
    by_size = result["by_size"]
    assert [by_size[name]["count"] for name in ("small", "medium", "large")] == [1, 2, 2]
    assert by_size["medium"]["mean_iou_coarse"] == pytest.approx(0.5)
    assert by_size["large"]["share_improved"] == 1.0


def test_size_buckets_use_the_gt_box_area_without_areas():
    gt = boxes((0, 0, 31.5, 32), (0, 0, 32, 32), (0, 0, 96, 96))  # area 1008, 1024 (medium), 9216 (large)
    result = box_metrics(gt, gt, gt)
    assert [result["by_size"][name]["count"] for name in ("small", "medium", "large")] == [1, 1, 1]


def test_empty_buckets_and_empty_input_are_null_and_serialisable():
    gt = boxes((0, 0, 10, 10))  # small only
    result = box_metrics(gt, gt, gt)
    large = result["by_size"]["large"]
    assert set(large) == GROUP_KEYS
    assert large["count"] == 0
    assert large["mean_iou_coarse"] is None and large["share_improved"] is None
    assert large["recall_at_iou"]["refined"] == {"0.5": None, "0.75": None, "0.9": None}
    json.dumps(result, allow_nan=False)

    empty = box_metrics(boxes(), boxes(), boxes())
    assert empty["count"] == 0 and empty["mean_iou_refined"] is None
    json.dumps(empty, allow_nan=False)
    # The records' type reads exactly what was computed, empty groups included, and gives it back.
    for figures in (result, empty, large):
        assert BoxFigures.from_json(figures).to_json() == figures
    with pytest.raises(ValueError, match="unknown field extra"):  # a new figure is refused, never dropped
        BoxFigures.from_json({**large, "extra": 1.0})


def test_degenerate_boxes_overlap_nothing():
    gt = boxes((0, 0, 10, 10), (5, 5, 5, 5), (0, 0, 10, 10))
    other = boxes((0, 0, 10, 10), (5, 5, 5, 5), (10, 10, 0, 0))  # identical zero-size box; inverted corners
    assert paired_iou(gt.double(), other.double()).tolist() == [1.0, 0.0, 0.0]


def test_paired_iou_is_the_box_iou_diagonal_across_chunks():
    generator = torch.Generator().manual_seed(0)
    n = 3 * metrics.IOU_CHUNK + 5
    corner = torch.rand(n, 2, generator=generator) * 500
    a = torch.cat([corner, corner + 1 + torch.rand(n, 2, generator=generator) * 100], dim=1).double()
    b = a + torch.randn(n, 4, generator=generator, dtype=torch.float64) * 10
    b = torch.cat([b[:, :2], torch.maximum(b[:, 2:], b[:, :2] + 1)], dim=1)
    assert torch.equal(paired_iou(a, b), box_iou(a, b).diagonal())


@pytest.mark.parametrize(
    ("gt", "coarse", "refined", "areas", "message"),
    [
        (boxes((0, 0, 1, 1)), boxes(), boxes((0, 0, 1, 1)), None, "must pair up"),
        (torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3), None, "N x 4"),
        (boxes((0, 0, 1, 1)), boxes((0, 0, float("nan"), 1)), boxes((0, 0, 1, 1)), None, "NaN"),
        (boxes((0, 0, 1, 1)), boxes((0, 0, 1, 1)), boxes((0, 0, 1, 1)), torch.ones(2), "areas"),
        (boxes((0, 0, 1, 1)), boxes((0, 0, 1, 1)), boxes((0, 0, 1, 1)), torch.tensor([float("nan")]), "areas"),
    ],
)
def test_bad_inputs_are_one_line_errors(gt, coarse, refined, areas, message):
    with pytest.raises(RefineError, match=message):
        box_metrics(gt, coarse, refined, areas)


# --- box_metrics: properties ------------------------------------------------------------------------------

coordinate = st.floats(0, 1000, allow_nan=False)
size = st.floats(0, 400, allow_nan=False)  # zero-size boxes included
xywh = st.tuples(coordinate, coordinate, size, size)


@st.composite
def box_triples(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = draw(st.integers(0, 12))
    triple = []
    for _ in range(3):
        rows = draw(st.lists(xywh, min_size=n, max_size=n))
        triple.append(boxes(*[(x, y, x + w, y + h) for x, y, w, h in rows]))
    return triple[0], triple[1], triple[2]


@settings(max_examples=60, deadline=None)
@given(box_triples())
def test_metric_properties_hold_for_any_boxes(triple):
    gt, coarse, refined = triple
    iou = paired_iou(gt.double(), refined.double())
    assert torch.isfinite(iou).all() and ((iou >= 0) & (iou <= 1)).all()

    result = box_metrics(gt, coarse, refined)
    assert set(result) == GROUP_KEYS | {"by_size"}
    assert sum(group["count"] for group in result["by_size"].values()) == result["count"] == len(gt)
    for group in [result, *result["by_size"].values()]:
        assert set(group) >= GROUP_KEYS
        if group["count"] == 0:
            assert group["share_improved"] is None
            continue
        for key in ("mean_iou_coarse", "mean_iou_refined", "share_improved", "share_worse"):
            assert 0.0 <= group[key] <= 1.0
        assert group["share_improved"] + group["share_worse"] <= 1.0
        for recall in group["recall_at_iou"].values():
            assert 1.0 >= recall["0.5"] >= recall["0.75"] >= recall["0.9"] >= 0.0
    json.dumps(result, allow_nan=False)


# --- image_bootstrap ---------------------------------------------------------------------------------------
def test_bootstrap_resamples_whole_images() -> None:
    # Two images of three boxes: one image's boxes all made worse, the other's all improved. Drawing two
    # images with replacement gives a share worse of 0, 1/2 or 1 (1/4, 1/2, 1/4): the 90% interval is [0, 1].
    # Resampling the six boxes independently would have given a far narrower one.
    coarse = torch.full((6,), 0.5, dtype=torch.float64)
    refined = torch.tensor([0.4, 0.4, 0.4, 0.7, 0.7, 0.7], dtype=torch.float64)
    interval = metrics.image_bootstrap(coarse, refined, torch.tensor([0, 0, 0, 1, 1, 1]))
    assert interval["level"] == 0.9 and interval["resamples"] == metrics.BOOTSTRAP_RESAMPLES
    assert interval["share_worse"] == pytest.approx([0.0, 1.0])
    assert interval["mean_iou_gain"] == pytest.approx([-0.1, 0.2])
    assert Interval.from_json(interval).to_json() == interval


def test_bootstrap_brackets_the_figures_and_narrows_with_more_images() -> None:
    generator = torch.Generator().manual_seed(1)
    images, per_image = 40, 5
    coarse = torch.rand(images * per_image, generator=generator, dtype=torch.float64) * 0.5 + 0.3
    refined = coarse + torch.randn(images * per_image, generator=generator, dtype=torch.float64) * 0.1 + 0.05
    index = torch.arange(images).repeat_interleave(per_image)
    interval = metrics.image_bootstrap(coarse, refined, index)
    gain, worse = (refined - coarse).mean().item(), (refined < coarse - metrics.CHANGE_EPS).double().mean().item()
    assert interval["mean_iou_gain"][0] < gain < interval["mean_iou_gain"][1]
    assert interval["share_worse"][0] < worse < interval["share_worse"][1]
    # The same images four times over: the figures stay, the interval halves (1 / sqrt(4)).
    four = metrics.image_bootstrap(
        coarse.repeat(4), refined.repeat(4), torch.arange(4 * images).repeat_interleave(per_image)
    )
    width, four_width = (np.diff(i["mean_iou_gain"]).item() for i in (interval, four))
    assert four["mean_iou_gain"][0] < gain < four["mean_iou_gain"][1]
    assert four_width == pytest.approx(width / 2, rel=0.2)
    # Seeded: the same input gives the same interval.
    assert metrics.image_bootstrap(coarse, refined, index) == interval


def test_bootstrap_of_identical_images_has_no_spread_and_an_empty_group_none() -> None:
    coarse = torch.tensor([0.5, 0.6] * 5, dtype=torch.float64)
    refined = torch.tensor([0.7, 0.5] * 5, dtype=torch.float64)
    interval = metrics.image_bootstrap(coarse, refined, torch.arange(5).repeat_interleave(2))
    assert interval["mean_iou_gain"] == pytest.approx([0.05, 0.05])
    assert interval["share_worse"] == pytest.approx([0.5, 0.5])
    empty = torch.zeros(0, dtype=torch.float64)
    assert metrics.image_bootstrap(empty, empty, torch.zeros(0, dtype=torch.int64)) is None


# --- write_metrics ---------------------------------------------------------------------------------------


def test_write_metrics_is_deterministic_and_rounded(tmp_path: Path):
    first, second = tmp_path / "a" / "metrics.json", tmp_path / "b.json"
    write_metrics(first, {"b": 1 / 3, "a": {"z": [2 / 3, None], "y": 4}})
    write_metrics(second, {"a": {"y": 4, "z": [2 / 3, None]}, "b": 1 / 3})
    assert first.read_bytes() == second.read_bytes()
    text = first.read_text()
    assert text.index('"a"') < text.index('"b"') and text.endswith("\n")
    assert json.loads(text) == {"a": {"y": 4, "z": [0.666667, None]}, "b": 0.333333}


# --- coco_ap ---------------------------------------------------------------------------------------------


def coco_ground_truth(with_area: bool = True) -> dict:
    """Two 200 x 200 images with a small (10 x 10), a medium (50 x 50) and a large (120 x 120) box."""
    images = [{"id": i, "file_name": f"{i}.png", "width": 200, "height": 200} for i in (1, 2)]
    bboxes = [(1, [10, 10, 10, 10]), (1, [60, 60, 50, 50]), (2, [20, 30, 120, 120]), (2, [150, 150, 10, 10])]
    annotations = []
    for i, (image_id, bbox) in enumerate(bboxes, start=1):
        annotation = {"id": i, "image_id": image_id, "category_id": 1, "bbox": bbox}
        if with_area:
            annotation |= {"area": bbox[2] * bbox[3], "iscrowd": 0}
        annotations.append(annotation)
    return {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "thing"}]}


def detections_for(gt: dict, shift: float = 0.0) -> list[dict]:
    """One detection per ground-truth box, moved right by `shift` of its width."""
    return [
        {"image_id": a["image_id"], "category_id": 1, "score": 0.9, "bbox": [x + shift * w, y, w, h]}
        for a in gt["annotations"]
        for x, y, w, h in [a["bbox"]]
    ]


def test_perfect_detections_score_ap_one(capsys: pytest.CaptureFixture[str]):
    gt = coco_ground_truth()
    result = coco_ap(gt, detections_for(gt))
    assert result == pytest.approx(dict.fromkeys(("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large"), 1.0))
    assert capsys.readouterr().out == ""


def test_no_detections_score_zero_and_missing_sizes_are_null():
    gt = coco_ground_truth()
    assert coco_ap(gt, []) == dict.fromkeys(("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large"), 0.0)
    gt["annotations"] = [a for a in gt["annotations"] if a["bbox"][2] == 10]  # small boxes only
    result = coco_ap(gt, detections_for(gt))
    assert result["AP_small"] == pytest.approx(1.0) and result["AP_medium"] is None and result["AP_large"] is None


def test_shifted_boxes_reduce_ap_and_inputs_stay_unchanged():
    gt = coco_ground_truth(with_area=False)  # area and iscrowd filled in from the boxes
    detections = detections_for(gt, shift=0.2)  # IoU 0.8 / 1.2 = 0.667: a match at 0.5, not at 0.75
    before = copy.deepcopy((gt, detections))
    result = coco_ap(gt, detections)
    assert result["AP50"] == pytest.approx(1.0)
    assert result["AP75"] == 0.0
    assert 0.0 < result["AP"] < 1.0
    assert (gt, detections) == before


def test_detections_on_unknown_images_are_an_error():
    with pytest.raises(RefineError, match="image_id 7"):
        coco_ap(coco_ground_truth(), [{"image_id": 7, "category_id": 1, "score": 1.0, "bbox": [0, 0, 5, 5]}])


# --- overlays --------------------------------------------------------------------------------------------


def has_colour(pixels: np.ndarray, colour: tuple[int, int, int]) -> bool:
    return bool((pixels == np.array(colour, np.uint8)).all(axis=-1).any())


def test_overlay_draws_each_kind_in_its_colour_with_a_legend():
    image = Image.new("L", (300, 300), 255)  # any mode comes back RGB
    gt, coarse, refined = [(50, 100, 250, 250)], [(10, 60, 40, 90)], torch.tensor([[260.0, 60.0, 290.0, 90.0]])
    out = draw_overlay(image, gt, coarse, refined)
    assert out.mode == "RGB" and out.size == image.size
    assert image.getpixel((150, 100)) == 255  # the input is left alone
    pixels = np.asarray(out)
    for x, y in [(150, 100), (50, 175), (250, 175), (150, 250)]:  # the middle of each GT edge
        assert tuple(pixels[y, x]) == GT_COLOUR
    assert has_colour(pixels[55:95, 5:45], COARSE_COLOUR)
    assert has_colour(pixels[55:95, 255:295], REFINED_COLOUR)
    legend = pixels[:40]
    for colour in (GT_COLOUR, COARSE_COLOUR, REFINED_COLOUR):
        assert has_colour(legend, colour)
    assert pixels[2, -2].max() < 128  # the strip darkens the white image...
    assert tuple(pixels[50, -2]) == (255, 255, 255)  # ...only at the top


def test_refined_box_on_its_ground_truth_shows_both():
    box = [(50, 100, 250, 250)]
    pixels = np.asarray(draw_overlay(Image.new("RGB", (300, 300)), box, [], box))
    column = pixels[90:110, 150]
    assert has_colour(column, GT_COLOUR) and has_colour(column, REFINED_COLOUR)


def test_save_overlays_writes_at_most_limit_and_reads_no_further(tmp_path: Path):
    taken = []

    def items():
        for i in range(5):
            taken.append(i)
            yield f"dir/img{i}.jpg", Image.new("RGB", (320, 240)), [(10, 40, 100, 100)], [], [], None

    paths = save_overlays(tmp_path / "overlays", items(), limit=2)
    assert [p.name for p in paths] == ["overlay_dir_img0.jpg.png", "overlay_dir_img1.jpg.png"]
    for path in paths:
        with Image.open(path) as written:
            assert written.size == (320, 240)
    assert taken == [0, 1]
