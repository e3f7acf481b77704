"""The wrong-edge cases: does reading each side at its distribution's main mode, instead of its expectation,
keep a second mode (a neighbour's edge, a shadow) from pulling the side between the two?

    python bench/side_readout.py [--store data/features.zarr] [--annotations data/demo/val.json]
                                 [--model data/refiner/model.pt ...] [--windows 1 2 3 5] [--out bench/results]

On a trained refiner, unchanged, every box of the split refined (the fixed noise draw of `refine evaluate`)
with each side read as the expectation over all positions (as trained: `all`) and over the k positions
either side of the most probable one (`k`), in every cascade stage. For each: mean IoU, the share of boxes
made worse, and among those the share with one side off by more than 10% of the true box's size (the
"wrong edge" of docs/experiments.md). Several --model checkpoints (seeds) give one row each. Writes
`<out>/side_readout.json`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from pipeline.inference.core import load_model
from pipeline.boxes import valid_boxes
from pipeline.splits import coarse_and_targets, load_split
from pipeline.metrics import made_worse, paired_iou
from pipeline.model.refiner import SideHead
from pipeline.store import FeatureStore

from results_file import write_and_show  # bench/, next to this script

WRONG_EDGE = 0.10  # a side off by more than this share of the true box's width (x) or height (y)


def side_errors(boxes: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """K x 4 xyxy boxes and truths -> K x 4 side errors in units of the true box's width / height."""
    size = (truth[:, 2:] - truth[:, :2]).clamp_min(1.0).repeat(1, 2)
    return (boxes - truth).abs() / size


@torch.inference_mode()
def readout_figures(model_path: Path, store: FeatureStore, annotations: Path, windows: list[int | None]) -> dict:
    model, namespace, checkpoint = load_model(model_path, store)
    split = load_split(namespace, annotations.stem, annotations)
    noise, seed = checkpoint.noise, checkpoint.seed
    heads = [module for module in model.modules() if isinstance(module, SideHead)]
    images = []
    for image in split.images:
        coarse, target = coarse_and_targets(image, noise, seed, None)
        embedding, early, plane = namespace.read_inputs(image.entry, with_plane=model.needs_plane, check=True)
        features = (
            torch.tensor(embedding[None]).float(),
            torch.tensor(early[None]).float(),
            None if plane is None else torch.tensor(plane[None]),
        )
        images.append((image, coarse, target, features))
    figures = {"seed": seed, "boxes": sum(len(coarse) for _, coarse, _, _ in images), "readouts": {}}
    for window in windows:
        for head in heads:
            head.mode_window = window
        iou_coarse, iou_refined, errors = [], [], []
        for image, coarse, target, (embedding, early, plane) in images:
            refinement = model.forward_stages(embedding, early, [coarse], plane)
            final = valid_boxes(refinement.stages[-1], coarse, image.resized_hw)
            iou_coarse.append(paired_iou(coarse, target))
            iou_refined.append(paired_iou(final, target))
            errors.append(side_errors(final, target))
        before, after, error = torch.cat(iou_coarse), torch.cat(iou_refined), torch.cat(errors)
        worse = made_worse(before, after)
        wrong_edge = (error.amax(dim=1) > WRONG_EDGE) & worse
        figures["readouts"]["all" if window is None else str(window)] = {
            "mean_iou_coarse": round(before.mean().item(), 4),
            "mean_iou_refined": round(after.mean().item(), 4),
            "share_worse": round(worse.double().mean().item(), 4),
            "share_of_worse_with_a_wrong_edge": round(wrong_edge.sum().item() / max(int(worse.sum()), 1), 4),
            "share_with_a_side_off_10pct": round((error.amax(dim=1) > WRONG_EDGE).double().mean().item(), 4),
        }
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", default="data/features.zarr", help="feature store (default data/features.zarr)")
    parser.add_argument("--annotations", type=Path, default=Path("data/demo/val.json"), help="split to refine")
    parser.add_argument("--model", type=Path, nargs="+", default=[Path("data/refiner/model.pt")], help="refiners")
    parser.add_argument("--windows", type=int, nargs="+", default=[1, 2, 3, 5], help="positions either side")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="folder for the JSON")
    args = parser.parse_args()
    store = FeatureStore(args.store)
    windows: list[int | None] = [None, *args.windows]
    runs = [readout_figures(path, store, args.annotations, windows) for path in args.model]
    write_and_show(args.out, "side_readout", {"annotations": args.annotations.name, "runs": runs})


if __name__ == "__main__":
    main()
