"""`refine evaluate` and `refine apply` on a model trained for real on the base dataset."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.helpers import assert_clean_error


def detections(base_dataset: dict) -> list[dict]:
    coco = json.loads(base_dataset["annotations"].read_text())
    rows = []
    for i, annotation in enumerate(coco["annotations"]):
        x, y, w, h = annotation["bbox"]
        rows.append(
            {
                "image_id": annotation["image_id"],
                "category_id": 1,
                "bbox": [x + 1, y + 1, w * 0.8, h * 0.8],
                "score": 0.9 - 0.1 * i,
                "note": f"det{i}",
            }
        )
    return rows


def test_evaluate_writes_metrics_and_overlays(cli, base_dataset, trained, tmp_path):
    out = tmp_path / "eval"
    result = cli(
        "evaluate",
        "--store",
        base_dataset["store"],
        "--annotations",
        base_dataset["annotations"],
        "--model",
        trained,
        "--out",
        out,
        "--images",
        base_dataset["images"],
        "--overlays",
        "2",
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("mean_iou_coarse", "mean_iou_refined", "share_improved", "share_worse"):
        assert 0.0 <= metrics[key] <= 1.0
    assert set(metrics["recall_at_iou"]["refined"]) == {"0.5", "0.75", "0.9"}
    assert set(metrics["by_size"]) == {"small", "medium", "large"}
    assert metrics["count"] == 4 and metrics["images"] == 4
    # How far the figures move over resampled images, for what apply writes and for every box refined.
    for figures in (metrics, metrics["without_abstention"]):
        low, high = figures["interval"]["mean_iou_gain"]
        assert low <= figures["mean_iou_refined"] - figures["mean_iou_coarse"] <= high
        low, high = figures["interval"]["share_worse"]
        assert low <= figures["share_worse"] <= high
    assert "90% interval over resampled images: gain " in result.stdout
    assert len(list((out / "overlays").glob("overlay_*.png"))) == 2


def test_evaluate_with_scored_detections_reports_coco_ap(cli, base_dataset, trained, tmp_path):
    coarse = tmp_path / "detections.json"
    coarse.write_text(json.dumps(detections(base_dataset)))
    out = tmp_path / "eval"
    result = cli(
        "evaluate",
        "--store",
        base_dataset["store"],
        "--annotations",
        base_dataset["annotations"],
        "--model",
        trained,
        "--out",
        out,
        "--coarse",
        coarse,
    )
    assert result.exit_code == 0, result.output
    ap = json.loads((out / "metrics.json").read_text())["coco_ap"]
    assert set(ap) == {"coarse", "refined"} and 0.0 <= ap["refined"]["AP"] <= 1.0


def test_apply_keeps_every_field_and_the_order(cli, base_dataset, trained, tmp_path):
    rows = detections(base_dataset)
    source = tmp_path / "detections.json"
    source.write_text(json.dumps(rows))
    out = tmp_path / "refined.json"
    result = cli("apply", "--store", base_dataset["store"], "--boxes", source, "--model", trained, "--out", out)
    assert result.exit_code == 0, result.output
    refined = json.loads(out.read_text())
    assert [r["note"] for r in refined] == [r["note"] for r in rows]
    assert [(r["image_id"], r["score"]) for r in refined] == [(r["image_id"], r["score"]) for r in rows]
    sizes = {i["id"]: (i["width"], i["height"]) for i in json.loads(base_dataset["annotations"].read_text())["images"]}
    for row in refined:
        x, y, w, h = row["bbox"]
        width, height = sizes[row["image_id"]]
        assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= width + 1e-6 and y + h <= height + 1e-6


def test_apply_to_a_coco_dataset_file(cli, base_dataset, trained, tmp_path):
    out = tmp_path / "refined.json"
    result = cli(
        "apply",
        "--store",
        base_dataset["store"],
        "--boxes",
        base_dataset["annotations"],
        "--model",
        trained,
        "--out",
        out,
    )
    assert result.exit_code == 0, result.output
    before = json.loads(base_dataset["annotations"].read_text())
    after = json.loads(out.read_text())
    assert after["images"] == before["images"]
    assert [a["id"] for a in after["annotations"]] == [a["id"] for a in before["annotations"]]


def test_apply_names_images_without_features(cli, base_dataset, trained, tmp_path):
    rows = detections(base_dataset) + [{"image_id": 999, "category_id": 1, "bbox": [1, 1, 5, 5], "score": 0.1}]
    source = tmp_path / "detections.json"
    source.write_text(json.dumps(rows))
    out = tmp_path / "refined.json"
    out.write_text("earlier output")
    result = cli("apply", "--store", base_dataset["store"], "--boxes", source, "--model", trained, "--out", out)
    assert_clean_error(result, "detections.json", "have no features", "999", "refine extract")
    assert out.read_text() == "earlier output"


def test_store_of_another_encoder_is_refused(cli, base_dataset, trained, tmp_path):
    other = tmp_path / "other.zarr"
    shutil.copytree(base_dataset["store"], other)
    (fingerprint,) = [p for p in other.iterdir() if p.is_dir()]
    fingerprint.rename(other / "0123456789abcdef")
    for command in (
        (
            "evaluate",
            "--store",
            other,
            "--annotations",
            base_dataset["annotations"],
            "--model",
            trained,
            "--out",
            tmp_path / "e",
        ),
        (
            "apply",
            "--store",
            other,
            "--boxes",
            base_dataset["annotations"],
            "--model",
            trained,
            "--out",
            tmp_path / "a.json",
        ),
    ):
        assert_clean_error(cli(*command), "model.pt", "was trained on features of encoder", "holds none of them")


def test_training_validation_matches_evaluate(cli, base_dataset, trained, tmp_path):
    # Both score the boxes `apply` would write (clipped to the image) on the same fixed noise draw.
    out = tmp_path / "eval"
    result = cli(
        "evaluate",
        "--store",
        base_dataset["store"],
        "--annotations",
        base_dataset["annotations"],
        "--model",
        trained,
        "--out",
        out,
    )
    assert result.exit_code == 0, result.output
    evaluated = json.loads((out / "metrics.json").read_text())
    trained_metrics = json.loads((trained.parent / "train_metrics.json").read_text())
    # metrics.json rounds to 6 decimals
    assert evaluated["abstention"]["min_score"] == pytest.approx(trained_metrics["abstention"]["min_score"], abs=1e-6)
    # Training's "val" refines every box; its "abstained" keeps the coarse box below the threshold, as apply does.
    for validated, judged in (
        (trained_metrics["val"], evaluated["without_abstention"]),
        (trained_metrics["val"]["abstained"], evaluated),
    ):
        assert validated["mean_iou_coarse"] == pytest.approx(judged["mean_iou_coarse"], abs=1e-4)
        assert validated["mean_iou_refined"] == pytest.approx(judged["mean_iou_refined"], abs=1e-4)
        # One summary function for both: the same keys, and the same rule for what counts as a change.
        for key in ("share_improved", "share_worse"):
            assert validated[key] == pytest.approx(judged[key], abs=1e-6)
        assert validated["recall_at_iou"]["refined"] == pytest.approx(judged["recall_at_iou"]["refined"], abs=1e-6)
