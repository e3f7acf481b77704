"""`refine apply --method snap` and `refine evaluate --methods`: snap beside the refiner, from the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from pycocotools import mask as mask_utils

from tests.helpers import assert_clean_error


def test_apply_snap_writes_boxes_scores_and_masks(cli, base_dataset, tmp_path):
    coco = json.loads(base_dataset["annotations"].read_text())
    sizes = {image["id"]: (image["height"], image["width"]) for image in coco["images"]}
    out = tmp_path / "snapped.json"
    args = ["apply", "--method", "snap", "--store", base_dataset["store"], "--boxes", base_dataset["annotations"]]
    result = cli(*args, "--out", out, "--masks")
    assert result.exit_code == 0, result.output
    assert "RANDOM-INIT" in result.stderr and "min score 0.000 (snap's default: every box with a mask)" in result.output
    snapped = json.loads(out.read_text())
    assert [a["id"] for a in snapped["annotations"]] == [a["id"] for a in coco["annotations"]]
    for before, after in zip(coco["annotations"], snapped["annotations"], strict=True):
        assert after["refine"]["coarse_bbox"] == before["bbox"] and 0.0 <= after["refine"]["score"] <= 1.0
        if after["refine"]["kept_coarse"]:
            assert after["bbox"] == before["bbox"] and "segmentation" not in after
            continue
        rle = after["segmentation"]
        assert rle["size"] == list(sizes[after["image_id"]])
        # The box written is the tight box of the mask written (pycocotools' own reading of it).
        assert after["bbox"] == pytest.approx(mask_utils.toBbox(rle).tolist(), abs=0.01)
        assert after["area"] == float(mask_utils.area(rle))


def test_apply_snap_refuses_weights_that_did_not_make_the_store(cli, base_dataset, tmp_path):
    weights = tmp_path / "sam_hq_other.pth"
    torch.save({"mask_decoder.iou_token.weight": torch.zeros(1, 256)}, weights)
    out = tmp_path / "snapped.json"
    args = ["apply", "--method", "snap", "--store", base_dataset["store"], "--boxes", base_dataset["annotations"]]
    result = cli(*args, "--out", out, "--checkpoint", weights)
    assert_clean_error(result, "sam_hq_other.pth", "holds no features of these weights")
    assert not out.exists()


def test_evaluate_scores_each_method_side_by_side(cli, base_dataset, trained, tmp_path):
    out = tmp_path / "eval"
    args = ["evaluate", "--store", base_dataset["store"], "--annotations", base_dataset["annotations"]]
    result = cli(
        *args,
        "--model",
        trained,
        "--out",
        out,
        "--methods",
        "coarse,snap,refiner",
        "--images",
        base_dataset["images"],
        "--overlays",
        "1",
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    methods = metrics["methods"]
    assert set(methods) == {"coarse", "snap", "refiner"}
    # Each method has the keys of the top level; coarse against itself changes nothing.
    assert set(methods["snap"]) == set(methods["refiner"]) == set(methods["coarse"])
    assert methods["coarse"]["mean_iou_refined"] == methods["coarse"]["mean_iou_coarse"] == metrics["mean_iou_coarse"]
    assert methods["coarse"]["share_improved"] == methods["coarse"]["share_worse"] == 0.0
    assert methods["refiner"]["mean_iou_refined"] == metrics["mean_iou_refined"]
    assert "snap" in result.output and len(list((out / "overlays").iterdir())) == 1
    bad = cli(*args, "--model", trained, "--out", tmp_path / "bad", "--methods", "coarse,magic")
    assert_clean_error(bad, "--methods", "magic")
