"""Which score tells good refined boxes from bad ones: the score `apply` writes (fitted on held-out images)
against the spread of the side distributions, on a trained refiner and a split it was not trained on.

    python bench/score.py [--store data/features.zarr] [--annotations data/demo/val.json]
                          [--model data/refiner/model.pt] [--max-worse 0.03] [--out bench/results]

For each candidate score: its AUROC for picking out the boxes that refining makes worse, and the abstention
frontier on the split (for thresholds on a grid: share changed, share worse, mean IoU written), with the best
mean IoU at a share worse of at most --max-worse. The threshold here is chosen on the split itself, so it is
an upper bound of what a threshold chosen elsewhere reaches; `refine evaluate` shows the honest figure.
Writes `<out>/score.json`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from pipeline.model.abstention import auroc, choose_min_score, risk_coverage
from pipeline.inference.core import load_model
from pipeline.splits import coarse_and_targets, load_split
from pipeline.metrics import made_worse, paired_iou
from pipeline.store import FeatureStore

from refined import read_image, refine, written  # bench/, next to this script
from results_file import write_and_show


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", default="data/features.zarr", help="feature store (default data/features.zarr)")
    parser.add_argument("--annotations", type=Path, default=Path("data/demo/val.json"), help="split to score on")
    parser.add_argument("--model", type=Path, default=Path("data/refiner/model.pt"), help="trained refiner")
    parser.add_argument("--max-worse", type=float, default=0.03, help="share worse allowed (default 0.03)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="folder for the JSON")
    args = parser.parse_args()

    model, namespace, checkpoint = load_model(args.model, FeatureStore(args.store))
    split = load_split(namespace, args.annotations.stem, args.annotations)
    noise, seed = checkpoint.noise, checkpoint.seed
    per_box: dict[str, list[torch.Tensor]] = {k: [] for k in ("iou_coarse", "iou_refined", "better", "spread")}
    for image in split.images:
        coarse, target = coarse_and_targets(image, noise, seed, None)
        refinement = refine(model, read_image(model, namespace, image), coarse)
        final = written(refinement, coarse, image)
        per_box["iou_coarse"].append(paired_iou(coarse, target))
        per_box["iou_refined"].append(paired_iou(final, target))
        per_box["better"].append(model.score.probability(refinement.score_logits))  # the score apply writes
        # The last stage's four side spreads (window units, at most 0.5): wide distributions mean doubt.
        per_box["spread"].append(1 - 2 * refinement.spread.mean(dim=1))
    values = {name: torch.cat(parts) for name, parts in per_box.items()}
    iou_coarse, iou_refined = values["iou_coarse"], values["iou_refined"]
    worse = made_worse(iou_coarse, iou_refined)
    result: dict = {
        "annotations": args.annotations.name,
        "boxes": len(worse),
        "share_worse_all_refined": worse.double().mean().item(),
        "mean_iou_coarse": iou_coarse.mean().item(),
        "mean_iou_all_refined": iou_refined.mean().item(),
        "candidates": {},
    }
    labels = {
        "better": "the score: fitted chance that the refined box beats the coarse one",
        "spread": "1 - 2 x mean spread of the last stage's side distributions",
    }
    for name, label in labels.items():
        score = values[name]
        result["candidates"][name] = {
            "what": label,
            "auroc_worse": auroc(score, worse),
            "best_within_max_worse": choose_min_score(iou_coarse, iou_refined, score, args.max_worse),
            "frontier": risk_coverage(iou_coarse, iou_refined, score),
        }
    write_and_show(args.out, "score", result)


if __name__ == "__main__":
    main()
