"""Which evidence makes the score rank the refiner's bad boxes on new scenes: the shipped evidence against the
same with the refiner's own second opinions added, each refitted on the held-out images as `train` fits it.

    python bench/score_evidence.py --store S --train-annotations T.json --annotations V.json --model M.pt
                                   [--max-worse 0.03] [--out bench/results] [--name score_evidence]

The trained refiner is read unchanged. For the images `train` held out (the checkpoint's --holdout and seed,
16 noisy copies of each box) and for the val split, every box is refined once as `apply` does, and again:
- jitter: from 8 copies of the coarse box with each side moved by N(0, 0.05 x the box's side); the spread of
  the 8 results per side, over the box's size (4 values),
- again: from its own refined box; how far each side moves (over the box's size, 4 values),
- mirror: the features, plane and box mirrored left-right; how far each side lands from the first result.
For each evidence set the score is cross-fitted on the held-out boxes (`fit_score`), calibrated, and its
threshold chosen (`choose_min_score`, 90% bound) exactly as `train` does; on val: AUROC for picking out the
boxes refining makes worse, and what `apply` would write at that threshold. Writes `<out>/<name>.json`.
"""

from __future__ import annotations


import torch
from torch import Tensor

from pipeline.model.abstention import auroc, choose_min_score, written_iou
from pipeline.training.engine import BoxOutcomes
from pipeline.splits import ImageBoxes, coarse_and_targets
from pipeline.metrics import made_worse, paired_iou
from pipeline.model.base import Refiner
from pipeline.model.score import BoxScore
from pipeline.shapes import IMAGE_SIZE
from pipeline.store import Namespace
from pipeline.training.train import fit_abstention

from refined import score_bench_arguments, trained_run, read_image, refine, written  # bench/, next to this script
from results_file import write_and_show

JITTERS = 8
JITTER = 0.05
SETS = {
    "shipped": ("base",),
    "+ jitter": ("base", "jitter"),
    "+ again": ("base", "again"),
    "+ mirror": ("base", "mirror"),
    "+ all three": ("base", "jitter", "again", "mirror"),
}


def mirror(boxes: Tensor) -> Tensor:
    """K x 4 xyxy in the 1024 frame -> the same boxes mirrored left-right."""
    return torch.stack([IMAGE_SIZE - boxes[:, 2], boxes[:, 1], IMAGE_SIZE - boxes[:, 0], boxes[:, 3]], dim=1)


def image_evidence(
    model: Refiner, namespace: Namespace, image: ImageBoxes, coarse: Tensor, target: Tensor
) -> dict[str, Tensor]:
    """One image's boxes: coarse and refined IoU, the shipped score, and every candidate evidence (K x F)."""
    inputs = read_image(model, namespace, image)
    first = refine(model, inputs, coarse)
    refined = first.stages[-1]
    size = (coarse[:, 2:] - coarse[:, :2]).clamp_min(1.0).repeat(1, 2)
    generator = torch.Generator().manual_seed(image.image_id)
    jittered = []
    for _ in range(JITTERS):
        moved = coarse + torch.randn(coarse.shape, generator=generator) * JITTER * size
        jittered.append(refine(model, inputs, moved).stages[-1])
    again = refine(model, inputs, refined).stages[-1]
    mirrored = mirror(refine(model, inputs.flipped(), mirror(coarse)).stages[-1])
    return {
        "iou_coarse": paired_iou(coarse, target),
        "iou_refined": paired_iou(written(first, coarse, image), target),
        "score": model.score.probability(first.score_logits),
        "image": torch.full((len(coarse),), image.image_id, dtype=torch.int64),
        "base": first.evidence,
        "jitter": torch.stack(jittered).std(dim=0) / size,
        "again": (again - refined).abs() / size,
        "mirror": (mirrored - refined).abs() / size,
    }


def split_evidence(
    model: Refiner,
    namespace: Namespace,
    images: list[ImageBoxes],
    noise: float,
    seed: int,
    copies: int,
) -> dict[str, Tensor]:
    """Every image's `image_evidence`, concatenated."""
    parts = []
    for image in images:
        coarse, target = coarse_and_targets(image, noise, seed, None, copies)
        parts.append(image_evidence(model, namespace, image, coarse, target))
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


def outcomes(split: dict[str, Tensor], names: tuple[str, ...]) -> BoxOutcomes:
    """The split's boxes with the evidence `names` as what the score reads."""
    evidence = torch.cat([split[n] for n in names], dim=1)
    return BoxOutcomes(split["iou_coarse"], split["iou_refined"], split["score"], evidence, split["image"])


def evaluate_set(held: dict[str, Tensor], val: dict[str, Tensor], names: tuple[str, ...], max_worse: float) -> dict:
    """Fit a score on the held-out boxes' evidence `names` as `train` does; its figures on val."""
    held_boxes, val_boxes = outcomes(held, names), outcomes(val, names)
    score = BoxScore(held_boxes.evidence.shape[1])
    chosen = fit_abstention(score, held_boxes, max_worse)
    val_score = score.probability(score(val_boxes.evidence))
    iou_coarse, iou_refined = val_boxes.iou_coarse, val_boxes.iou_refined
    kept = written_iou(iou_coarse, iou_refined, val_score, chosen.min_score)
    upper = choose_min_score(iou_coarse, iou_refined, val_score, max_worse)
    return {
        "features": held_boxes.evidence.shape[1],
        "ridge": chosen.ridge,
        "min_score": chosen.min_score,
        "val_auroc_worse": auroc(val_score, made_worse(iou_coarse, iou_refined)),
        "val_mean_iou_written": kept.mean().item(),
        "val_share_worse_written": made_worse(iou_coarse, kept).double().mean().item(),
        "val_share_changed": (val_score >= chosen.min_score).double().mean().item(),
        "val_best_within_max_worse": upper["mean_iou"],  # the threshold chosen on val itself: an upper bound
    }


@torch.inference_mode()
def main() -> None:
    args = score_bench_arguments(__doc__, "score_evidence")
    run = trained_run(args)
    held, val = run.on_held_out_and_val(split_evidence)
    result = {
        "model_seed": run.checkpoint.seed,
        "held_out": {"images": len(run.held_images), "boxes": len(held["image"])},
        "val": {
            "images": len(run.val.images),
            "boxes": len(val["image"]),
            "mean_iou_coarse": val["iou_coarse"].mean().item(),
            "mean_iou_every_box": val["iou_refined"].mean().item(),
        },
        "jitters": JITTERS,
        "jitter": JITTER,
        "sets": {name: evaluate_set(held, val, names, args.max_worse) for name, names in SETS.items()},
    }
    write_and_show(args.out, args.name, result)


if __name__ == "__main__":
    main()
