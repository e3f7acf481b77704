"""Do no harm: a score per box, abstention below a threshold chosen on held-out training images, the coarse box
kept beside the new one, border-crossing coarse boxes clipped, and the review page from the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.model.abstention import (
    CALIBRATION_MIN_SCALE,
    auroc,
    choose_min_score,
    fit_calibration,
    reliability,
    risk_coverage,
)
from pipeline.model.checkpoints import Checkpoint
from pipeline.training.config import TrainConfig
from pipeline.model.score import IDENTITY_CALIBRATION, RIDGE_GRID, BoxScore, fit_score
from pipeline.training.setup import hold_out
from pipeline.training.train import run_train
from tests.helpers import assert_clean_error


@pytest.fixture(scope="module")
def border_annotations(base_dataset: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The base images with ground truth cut by the image border (two boxes each, in opposite corners);
    named train.json, so it joins the store's `train` dataset."""
    coco = json.loads(base_dataset["annotations"].read_text())
    annotations = []
    for image in coco["images"]:
        w, h = image["width"], image["height"]
        for j, box in enumerate(([0, 0, w / 2, h / 3], [w / 2, h / 2, w / 2, h / 2])):
            annotations.append({"id": image["id"] * 10 + j, "image_id": image["id"], "category_id": 1, "bbox": box})
    path = tmp_path_factory.mktemp("border") / "train.json"
    path.write_text(json.dumps({**coco, "annotations": annotations}))
    return path


@pytest.fixture(scope="module")
def trained(base_dataset: dict, border_annotations: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("refiner")
    # Two of the four images held out: the score's two folds have an image each to fit on.
    config = TrainConfig(
        store=str(base_dataset["store"]), annotations=border_annotations, out=out, epochs=1, batch_size=2, holdout=0.5
    )
    run_train(config)
    return out / "model.pt"


def apply(cli, base_dataset: dict, trained: Path, boxes: Path, out: Path, *options: str):
    """`refine apply` of `boxes` on the base store with the trained model, writing `out`."""
    return cli("apply", "--store", base_dataset["store"], "--boxes", boxes, "--model", trained, "--out", out, *options)


def _scores(refined: list[dict]) -> list[float]:
    return [r["refine"]["score"] for r in refined]


# --- abstention, as pure functions ----------------------------------------------------------------------


def test_the_threshold_is_the_best_mean_iou_within_the_share_worse_allowed() -> None:
    iou_coarse = torch.tensor([0.5, 0.5, 0.5, 0.5])
    iou_refined = torch.tensor([0.9, 0.8, 0.4, 0.7])
    score = torch.tensor([0.9, 0.7, 0.3, 0.6])
    strict = choose_min_score(iou_coarse, iou_refined, score, max_worse=0.0)
    # Refusing only the one box it makes worse (score 0.3) is the best there is.
    assert strict["reached"] and strict["share_worse"] == 0.0
    assert strict["min_score"] == pytest.approx(0.6) and strict["mean_iou"] == pytest.approx(
        (0.9 + 0.8 + 0.5 + 0.7) / 4
    )
    # Allowing worse boxes changes nothing here: refining the bad one would lower the mean IoU.
    assert choose_min_score(iou_coarse, iou_refined, score, max_worse=0.25)["min_score"] == strict["min_score"]
    all_better = choose_min_score(iou_coarse, iou_refined.clamp_min(0.6), score, max_worse=0.0)
    assert all_better["min_score"] == pytest.approx(0.3) and all_better["share_changed"] == 1.0


def test_refining_nothing_always_meets_the_bar_and_no_boxes_refine_everything() -> None:
    # A box made worse that scores highest: only keeping every coarse box makes none worse.
    choice = choose_min_score(torch.tensor([0.5, 0.5]), torch.tensor([0.4, 0.9]), torch.tensor([0.9, 0.1]), 0.0)
    assert (
        choice["reached"] is True and choice["share_changed"] == 0.0 and choice["min_score"] > torch.tensor(0.9).item()
    )
    empty = choose_min_score(torch.zeros(0), torch.zeros(0), torch.zeros(0), 0.03)
    assert empty == {"min_score": 0.0, "max_worse": 0.03, "boxes": 0, "reached": False}


def test_auroc_matches_counting_pairs_with_ties_as_half() -> None:
    generator = torch.Generator().manual_seed(0)
    score = torch.randint(0, 5, (200,), generator=generator).double() / 4  # many ties
    worse = torch.rand(200, generator=generator) < 0.3
    pairs = score[~worse][:, None] - score[worse][None, :]
    expected = ((pairs > 0).double() + 0.5 * (pairs == 0).double()).mean().item()
    assert auroc(score, worse) == pytest.approx(expected)
    assert auroc(score, torch.zeros(200, dtype=torch.bool)) is None


def test_risk_coverage_and_reliability_add_up() -> None:
    iou_coarse = torch.tensor([0.5, 0.6, 0.7])
    iou_refined = torch.tensor([0.8, 0.5, 0.9])
    score = torch.tensor([0.95, 0.05, 0.55])
    points = risk_coverage(iou_coarse, iou_refined, score)
    assert points[0] == {
        "min_score": pytest.approx(0.05),
        "share_changed": 1.0,
        "share_worse": pytest.approx(1 / 3),
        "mean_iou": pytest.approx(2.2 / 3),
    }
    assert points[-1]["share_changed"] == 0.0 and points[-1]["mean_iou"] == pytest.approx(0.6)
    rows = reliability(score, torch.tensor([1.0, 0.0, 1.0]))
    assert [r["count"] for r in rows] == [1, 1, 1] and rows[0]["low"] == 0.0 and rows[-1]["high"] == 1.0


def test_calibration_recovers_the_chance_and_keeps_the_order() -> None:
    generator = torch.Generator().manual_seed(0)
    logit = torch.randn(20000, generator=generator) * 2
    better = torch.rand(20000, generator=generator) < torch.sigmoid(0.5 * logit - 1.0)
    scale, bias = fit_calibration(logit, better).tolist()
    assert scale == pytest.approx(0.5, abs=0.03) and bias == pytest.approx(-1.0, abs=0.05)
    # A logistic fit with a bias predicts, on average, exactly the share of (smoothed) positives.
    calibrated = torch.sigmoid(scale * logit.double() + bias)
    positives = int(better.sum())
    target = torch.where(better, (positives + 1) / (positives + 2), 1 / (len(better) - positives + 2))
    assert calibrated.mean().item() == pytest.approx(target.double().mean().item(), abs=1e-5)
    # A score that tells nothing is flattened to the share improved, never turned round.
    scale, bias = fit_calibration(logit, torch.rand(20000, generator=generator) < 0.3).tolist()
    assert 0 < scale < 0.05 and torch.sigmoid(torch.tensor(bias)).item() == pytest.approx(0.3, abs=0.01)
    scale, bias = fit_calibration(logit, logit < 0).tolist()  # a score that runs the wrong way
    assert scale == pytest.approx(CALIBRATION_MIN_SCALE)
    # Every box improved, or all scores equal: finite weights; no boxes: the identity.
    assert torch.isfinite(fit_calibration(logit, torch.ones(20000, dtype=torch.bool))).all()
    equal = fit_calibration(torch.full((5,), 3.0), torch.tensor([True, True, True, False, True]))
    assert torch.sigmoid(equal[0] * 3.0 + equal[1]).item() == pytest.approx((4 * 5 / 6 + 1 / 3) / 5, abs=1e-4)
    assert fit_calibration(torch.zeros(0), torch.zeros(0, dtype=torch.bool)).tolist() == [1.0, 0.0]


def test_a_threshold_chosen_on_images_holds_the_bound_not_just_the_share() -> None:
    """With the boxes' images, the share worse that must stay under max_worse is an upper bound over
    resamples of the images: never below the share itself, and so never a lower threshold."""
    generator = torch.Generator().manual_seed(3)
    groups = torch.arange(30).repeat_interleave(20)
    iou_coarse = torch.rand(600, generator=generator)
    # Images differ in how often refining hurts: boxes of one image rise and fall together.
    hurts = torch.rand(30, generator=generator)[groups] * 0.3
    worse = torch.rand(600, generator=generator) < hurts
    iou_refined = torch.where(worse, iou_coarse * 0.8, (iou_coarse + 0.1).clamp(max=1))
    score = (~worse).double() * 0.3 + torch.rand(600, generator=generator, dtype=torch.float64)
    plain = choose_min_score(iou_coarse, iou_refined, score, 0.03)
    bounded = choose_min_score(iou_coarse, iou_refined, score, 0.03, groups)
    assert plain["share_worse_bound"] == plain["share_worse"] <= 0.03
    assert bounded["share_worse"] <= bounded["share_worse_bound"] <= 0.03
    assert bounded["share_worse_bound"] > bounded["share_worse"]
    assert bounded["min_score"] >= plain["min_score"] and bounded["share_changed"] < plain["share_changed"]
    assert choose_min_score(iou_coarse, iou_refined, score, 0.03, groups) == bounded  # seeded: the same each time


def test_the_score_is_a_cross_fitted_logistic_regression_on_the_evidence() -> None:
    generator = torch.Generator().manual_seed(4)
    groups = torch.arange(12).repeat_interleave(50)
    signal = torch.randn(600, generator=generator)
    better = signal + 0.5 * torch.randn(600, generator=generator) > 0
    # One feature tells, one is noise on another scale, one is constant.
    evidence = torch.stack([signal * 5 + 2, torch.randn(600, generator=generator) * 100, torch.full((600,), 7.0)], 1)
    fit = fit_score(evidence, better, groups)
    assert fit.ridge in RIDGE_GRID
    assert fit.weight[0] > 1 and abs(fit.weight[1]) < fit.weight[0] / 10 and fit.weight[2] == 0
    assert fit.inverse_std[2] == 0 and torch.isfinite(fit.out_of_fold).all()
    assert auroc(fit.out_of_fold, ~better) > 0.9  # out of fold: scored by a fit that never saw the image
    score = BoxScore(3)
    assert score.probability(score(evidence)).unique().tolist() == [0.5]  # before `train` installs a fit
    score.install(fit, torch.tensor([2.0, -1.0]))
    expected = torch.sigmoid(2 * ((evidence - fit.mean) * fit.inverse_std @ fit.weight + fit.intercept) - 1)
    assert score.probability(score(evidence)) == pytest.approx(expected, abs=1e-6)
    # One image, or one outcome: nothing to learn, the constant (smoothed) log-odds of `better`.
    every = torch.ones(600, dtype=torch.bool)
    for few in (fit_score(evidence, better, torch.zeros(600)), fit_score(evidence, every, groups)):
        assert few.ridge is None and few.weight.abs().sum() == 0 and few.out_of_fold.unique().numel() == 1


def test_calibrating_the_score_keeps_the_boxes_the_threshold_refines() -> None:
    generator = torch.Generator().manual_seed(2)
    iou_coarse = torch.rand(500, generator=generator)
    iou_refined = (iou_coarse + torch.randn(500, generator=generator) * 0.1).clamp(0, 1)
    logit = (iou_refined - iou_coarse) * 20 + torch.randn(500, generator=generator)
    calibration = fit_calibration(logit, iou_refined > iou_coarse)
    raw = choose_min_score(iou_coarse, iou_refined, torch.sigmoid(logit), 0.03)
    calibrated = choose_min_score(iou_coarse, iou_refined, torch.sigmoid(logit * calibration[0] + calibration[1]), 0.03)
    assert raw["min_score"] != calibrated["min_score"]
    for key in ("share_changed", "share_worse", "mean_iou"):
        assert calibrated[key] == raw[key]


def test_held_out_images_are_a_keyed_share_never_trained_on(base_dataset: dict) -> None:
    class Image:
        def __init__(self, image_id: int) -> None:
            self.image_id = image_id

    boxes = [Image(i) for i in range(40)]
    trained, held = hold_out(boxes, 0.25, seed=0)
    assert len(held) == 10 and not {b.image_id for b in trained} & {b.image_id for b in held}
    _, held_again = hold_out(list(reversed(boxes)), 0.25, seed=0)  # the file's order does not matter
    assert {b.image_id for b in held_again} == {b.image_id for b in held}
    assert {b.image_id for b in hold_out(boxes, 0.25, seed=1)[1]} != {b.image_id for b in held}
    assert hold_out(boxes, 0.0, seed=0) == (boxes, [])


# --- train, apply and evaluate ------------------------------------------------------------------------


def test_the_checkpoint_holds_the_score_and_threshold_fitted_on_held_out_images(trained: Path) -> None:
    checkpoint = Checkpoint.load(trained)
    abstention = checkpoint.metrics.abstention
    # Two held-out images, two boxes each, sixteen noisy copies of each box.
    assert abstention.boxes == 64 and abstention.max_worse == 0.02
    assert 0.0 <= abstention.min_score <= 1.0
    assert abstention.share_worse is not None and abstention.share_worse_bound is not None
    assert abstention.share_worse <= abstention.share_worse_bound <= 0.02
    assert abstention.ridge in RIDGE_GRID
    model = checkpoint.model
    assert model["score.weight"].abs().sum() > 0 and model["score.inverse_std"].min() >= 0
    # The score was calibrated on the same held-out boxes; the model applies what the metrics report.
    scale, bias = abstention.calibration
    assert scale > 0 and (scale, bias) != (1.0, 0.0)
    assert model["score.calibration"].tolist() == pytest.approx([scale, bias])


def test_a_checkpoint_with_the_learnt_score_head_is_refused_with_what_to_run(
    cli, base_dataset, border_annotations, trained, tmp_path
):
    checkpoint = torch.load(trained, map_location="cpu", weights_only=True)
    old = tmp_path / "old.pt"
    torch.save({**checkpoint, "version": 5}, old)
    out = tmp_path / "refined.json"
    result = apply(cli, base_dataset, old, border_annotations, out)
    assert_clean_error(result, "old.pt: refiner checkpoint version 5", "train the refiner again with `refine train`")
    assert not out.exists()


def test_apply_adds_a_refine_object_and_keeps_the_coarse_box_below_the_threshold(
    cli, base_dataset, border_annotations, trained, tmp_path
):
    coco = json.loads(border_annotations.read_text())
    rows = [
        {"image_id": a["image_id"], "category_id": 1, "bbox": [a["bbox"][0] + 1, a["bbox"][1] + 1, 10, 12], "n": i}
        for i, a in enumerate(coco["annotations"])
    ]
    source = tmp_path / "detections.json"
    source.write_text(json.dumps(rows))
    everything = tmp_path / "all.json"
    # The raw score: two held-out images may calibrate the score to nearly a constant (a scale near 0 says
    # they gave it little to rank by), and this test is about the threshold, not the calibration.
    checkpoint = torch.load(trained, weights_only=True)
    checkpoint["model"]["score.calibration"] = IDENTITY_CALIBRATION.clone()
    trained = tmp_path / "raw_score.pt"
    torch.save(checkpoint, trained)
    result = apply(cli, base_dataset, trained, source, everything, "--min-score", "0")
    assert result.exit_code == 0, result.output
    assert "min score 0.000 (given)" in result.output
    refined = json.loads(everything.read_text())
    assert [r["n"] for r in refined] == [r["n"] for r in rows]
    assert all(
        r["refine"]["coarse_bbox"] == row["bbox"] and not r["refine"]["kept_coarse"]
        for r, row in zip(refined, rows, strict=True)
    )
    scores = sorted(_scores(refined))
    assert all(0.0 <= s <= 1.0 for s in scores)
    # A threshold between two distinct scores near the median: the boxes below keep their coarse box, the
    # rest are refined (a tiny model's scores may tie, so the split is counted, not assumed to be half).
    distinct = sorted(set(scores))
    assert len(distinct) >= 2, scores
    upper = max(1, len(distinct) // 2)
    middle = (distinct[upper - 1] + distinct[upper]) / 2
    below = sum(score < middle for score in scores)
    half = tmp_path / "half.json"
    result = apply(cli, base_dataset, trained, source, half, "--min-score", str(middle))
    assert result.exit_code == 0, result.output
    for row, every, partly in zip(rows, refined, json.loads(half.read_text()), strict=True):
        kept = partly["refine"]["kept_coarse"]
        assert kept == (every["refine"]["score"] < middle)
        assert partly["bbox"] == (row["bbox"] if kept else every["bbox"])
    assert f"kept the coarse box of {below}" in result.output


def test_apply_uses_the_checkpoint_threshold_by_default(cli, base_dataset, trained, tmp_path):
    out = tmp_path / "refined.json"
    result = apply(cli, base_dataset, trained, base_dataset["annotations"], out)
    assert result.exit_code == 0, result.output
    threshold = Checkpoint.load(trained).min_score()
    assert f"min score {threshold:.3f} (chosen by `refine train` on held-out training images)" in result.output
    for annotation in json.loads(out.read_text())["annotations"]:
        score, kept = annotation["refine"]["score"], annotation["refine"]["kept_coarse"]
        assert kept if score < threshold - 1e-4 else not kept if score > threshold + 1e-4 else True


def test_a_coarse_box_across_the_border_is_clipped_and_counted(cli, base_dataset, trained, tmp_path):
    image = json.loads(base_dataset["annotations"].read_text())["images"][0]
    rows = [
        {"image_id": image["id"], "bbox": [-5.0, -3.0, 20.0, 15.0]},
        {"image_id": image["id"], "bbox": [image["width"] - 10.0, 2.0, 30.0, 10.0]},
        {"image_id": image["id"], "bbox": [2.0, 2.0, 10.0, 10.0]},
    ]
    source = tmp_path / "detections.json"
    source.write_text(json.dumps(rows))
    out = tmp_path / "refined.json"
    result = apply(cli, base_dataset, trained, source, out, "--min-score", "1")
    assert result.exit_code == 0, result.output
    assert "2 boxes clipped to the image" in result.output
    refined = json.loads(out.read_text())
    # Every box kept (threshold 1): the written box is the coarse box clipped to the image, the given one is kept.
    assert [r["bbox"] for r in refined] == [
        [0.0, 0.0, 15.0, 12.0],
        [image["width"] - 10.0, 2.0, 10.0, 10.0],
        [2.0, 2.0, 10.0, 10.0],
    ]
    assert [r["refine"]["coarse_bbox"] for r in refined] == [row["bbox"] for row in rows]


def test_a_box_wholly_outside_the_image_is_still_refused(cli, base_dataset, trained, tmp_path):
    source = tmp_path / "detections.json"
    source.write_text(json.dumps([{"image_id": 1, "bbox": [-50.0, 2.0, 20.0, 10.0]}]))
    out = tmp_path / "refined.json"
    result = apply(cli, base_dataset, trained, source, out)
    assert_clean_error(result, "detections.json: detection [0]", "does not overlap image 1")
    assert not out.exists()


def test_area_follows_the_box_only_where_it_was_the_box_area(cli, base_dataset, trained, tmp_path):
    coco = json.loads(base_dataset["annotations"].read_text())
    first, second, third, fourth = coco["annotations"]
    w, h = first["bbox"][2:]
    first["area"] = w * h  # the box's area: follows the new box
    second["area"] = 7.0  # a mask's area: stays
    third["area"] = third["bbox"][2] * third["bbox"][3]
    third["segmentation"] = [[0, 0, 1, 0, 1, 1]]  # area from a polygon: stays
    source = tmp_path / "coco.json"
    source.write_text(json.dumps(coco))
    out = tmp_path / "refined.json"
    result = apply(cli, base_dataset, trained, source, out, "--min-score", "0")
    assert result.exit_code == 0, result.output
    refined = json.loads(out.read_text())["annotations"]
    x, y, w2, h2 = refined[0]["bbox"]
    assert refined[0]["area"] == pytest.approx(w2 * h2, abs=0.01)
    assert refined[1]["area"] == 7.0 and refined[2]["area"] == third["area"] and "area" not in refined[3]
    assert "1 annotation areas follow their new box" in result.output


def test_evaluate_reports_abstention_and_the_trade_off(cli, base_dataset, border_annotations, trained, tmp_path):
    out = tmp_path / "eval"
    args = ["evaluate", "--store", base_dataset["store"], "--annotations", border_annotations, "--model", trained]
    result = cli(*args, "--out", out)
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    checkpoint_threshold = Checkpoint.load(trained).min_score()
    assert metrics["abstention"]["min_score"] == pytest.approx(checkpoint_threshold, abs=1e-6)
    assert f"min score {checkpoint_threshold:.3f}" in result.output
    every = metrics["without_abstention"]
    assert every["count"] == metrics["count"] == 8
    points = metrics["risk_coverage"]
    assert points[0]["share_changed"] == 1.0 and points[0]["share_worse"] == pytest.approx(
        every["share_worse"], abs=1e-6
    )
    assert points[0]["mean_iou"] == pytest.approx(every["mean_iou_refined"], abs=1e-6)
    assert sum(row["count"] for row in metrics["reliability"]) == 8
    auroc_value = metrics["abstention"]["auroc_worse"]
    assert auroc_value is None or 0.0 <= auroc_value <= 1.0
    assert json.loads((out / "risk_coverage.json").read_text()) == points
    # With threshold 0 the top-level figures are those of refining every box.
    result = cli(*args, "--out", tmp_path / "all", "--min-score", "0")
    assert result.exit_code == 0, result.output
    refined_all = json.loads((tmp_path / "all" / "metrics.json").read_text())
    assert refined_all["mean_iou_refined"] == pytest.approx(every["mean_iou_refined"], abs=1e-6)
    assert refined_all["share_worse"] == pytest.approx(every["share_worse"], abs=1e-6)


# --- the review page from the CLI ---------------------------------------------------------------------


def test_review_of_annotations_and_of_detections(cli, base_dataset, border_annotations, trained, tmp_path):
    coco = json.loads(border_annotations.read_text())
    coco["categories"] = [{"id": 1, "name": "<script>alert(1)</script>"}]
    annotations = tmp_path / "train.json"
    annotations.write_text(json.dumps(coco))
    out = tmp_path / "review"
    common = ["review", "--store", base_dataset["store"], "--model", trained, "--images", base_dataset["images"]]
    result = cli(*common, "--annotations", annotations, "--out", out)
    assert result.exit_code == 0, result.output
    page = (out / "index.html").read_text()
    assert "<script>alert(1)</script>" not in page and len(list((out / "crops").iterdir())) == 8
    assert "boxes 8" in result.output and "worse" in result.output
    detections = tmp_path / "detections.json"
    detections.write_text(json.dumps([{"image_id": a["image_id"], "bbox": a["bbox"]} for a in coco["annotations"][:3]]))
    result = cli(*common, "--boxes", detections, "--out", tmp_path / "review2", "--min-score", "0")
    assert result.exit_code == 0, result.output
    assert "boxes 3" in result.output and len(list((tmp_path / "review2" / "crops").iterdir())) == 3
    both = cli(*common, "--boxes", detections, "--annotations", annotations, "--out", tmp_path / "review3")
    assert both.exit_code == 2 and "exactly one of --boxes and --annotations" in both.output
    assert not (tmp_path / "review3").exists()
