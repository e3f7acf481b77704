"""How far localising each side to the nearest feature cell gets you: an upper bound for a cell-level refiner.

    python bench/cell_oracle.py [--annotations data/demo/val.json] [--out bench/results]

Each ground-truth box is mapped to the encoder-input frame (longest side 1024, as `extract` resizes), each
side snapped to the nearest multiple of a grid step (16 px: one 64 x 64 feature cell; also 8 and 4 px), and
compared with the unsnapped box. A refiner that finds every side's nearest cell boundary exactly reaches the
16 px row; beating it needs position information from inside a cell. `share_worse` compares the snapped box
with the coarse box `refine evaluate` draws by the noise protocol (--noise, --seed). Writes
`<out>/cell_oracle.json`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from pipeline.boxes import coco_to_xyxy, jitter_boxes, noise_generator, to_input
from pipeline.coco import load_coco
from pipeline.shapes import IMAGE_SIZE
from pipeline.images import resized_shape
from pipeline.metrics import iou_summary, paired_iou

from results_file import write_and_show  # bench/, next to this script

STEPS = (16, 8, 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--annotations", type=Path, default=Path("data/demo/val.json"), help="COCO dataset file")
    parser.add_argument("--noise", type=float, default=0.2, help="noise level r of the coarse boxes (default 0.2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the coarse boxes (default 0, as evaluate)")
    parser.add_argument(
        "--out", type=Path, default=Path("bench/results"), help="folder for the JSON (default bench/results)"
    )
    args = parser.parse_args()

    coco = load_coco(args.annotations)
    boxes_of: dict[int, list] = {image.id: [] for image in coco.images}
    for annotation in coco.annotations:
        boxes_of[annotation.image_id].append(annotation.bbox)
    truths, coarse = [], []
    for image in coco.images:
        original_hw = (image.height, image.width)
        resized_hw = resized_shape(*original_hw)
        truth = to_input(coco_to_xyxy(boxes_of[image.id]), original_hw, resized_hw)
        truths.append(truth)
        coarse.append(jitter_boxes(truth, resized_hw, args.noise, noise_generator(args.seed, image.id, None)))
    truth = torch.cat(truths)
    coarse_iou = paired_iou(torch.cat(coarse), truth)
    result: dict = {
        "annotations": args.annotations.name,
        "boxes": len(truth),
        "input_size": IMAGE_SIZE,
        "coarse_mean_iou": round(coarse_iou.mean().item(), 4),
        "steps": {},
    }
    for step in STEPS:
        iou = paired_iou((truth / step).round() * step, truth)
        summary = iou_summary(coarse_iou, iou)  # "worse" exactly as `refine evaluate` counts it
        result["steps"][f"{step}px"] = {
            "mean_iou": round(summary["mean_iou_refined"], 4),
            "share_below_0.8": round((iou < 0.8).float().mean().item(), 4),
            "share_below_0.9": round((iou < 0.9).float().mean().item(), 4),
            "share_worse": round(summary["share_worse"], 4),
        }
    write_and_show(args.out, "cell_oracle", result)


if __name__ == "__main__":
    main()
