"""Where the sub-cell information is: can a small decoder tell where inside a 16-px feature cell an edge lies?

    python bench/subcell_probe.py [--store data/features.zarr] [--demo data/demo] [--out bench/results]

On the demo (its scenes are redrawn from the seed, so every object's exact mask is known), each cell of the
64 x 64 grid that an object's outline crosses is a probe sample. Its target is the 4 x 4 occupancy of that
cell by the scene's objects (a stride-4 mask, thresholded at half). A two-layer MLP is trained on the train
split's cells and scored on the val split's, from each input in turn:

- `embedding`, `early`, `both`: the stored vectors of the cell itself (standardised per channel);
- `both, 3 x 3`: the same for the cell and its eight neighbours;
- `cell occupancy, 3 x 3` (no features): the true coarse mask of the cell and its neighbours, i.e. what a
  perfect cell-level refiner knows; bilinear upsampling of it is also scored, without training;
- `image 4 px, 3 x 3`: the encoder-input image averaged to stride 4 (what a 256 x 256 plane beside each
  entry would hold) over the cell and its neighbours;
- `cell occupancy + ...`: the true coarse mask next to the features or the image: what each adds to a
  perfect cell-level map, i.e. the sub-cell information proper.

Scores: sub-cell accuracy and the mean IoU of each cell's 4 x 4 foreground, on mixed cells (some sub-cells
in, some out) of the val split. Writes `<out>/subcell_probe.json`.
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pipeline.demo_data import render_scene
from pipeline.splits import load_split, resolve_namespace
from pipeline.images import prepare
from pipeline.shapes import GRID, IMAGE_SIZE
from pipeline.store import FeatureStore

from results_file import write_and_show  # bench/, next to this script

SUB = 4  # sub-cells per cell side: the stride-4 plane
FINE = GRID * SUB  # 256


def occupancy(scene_masks: list[np.ndarray], resized: tuple[int, int]) -> np.ndarray:
    """The share of each stride-4 pixel of the encoder input covered by an object: 256 x 256 float32."""
    union = np.zeros(scene_masks[0].shape, np.float32)
    for mask in scene_masks:
        union = np.maximum(union, mask.astype(np.float32))
    resized_mask = np.asarray(Image.fromarray(union).resize((resized[1], resized[0]), Image.Resampling.BOX))
    frame = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.float32)
    frame[: resized[0], : resized[1]] = resized_mask
    return frame.reshape(FINE, SUB, FINE, SUB).mean(axis=(1, 3))


def neighbourhood(grid: torch.Tensor) -> torch.Tensor:
    """C x 64 x 64 -> (9 C) x 64 x 64: each cell's vector next to its eight neighbours' (zeros past the edge)."""
    return F.unfold(grid[None], 3, padding=1).view(-1, GRID, GRID)


def samples(split, demo: Path, seed: int, namespace, limit: int) -> dict[str, torch.Tensor]:
    """Per mixed cell: every probe input and its 16 sub-cell targets."""
    inputs: dict[str, list[torch.Tensor]] = {}
    for image in split.images[:limit]:
        split_name, index = re.fullmatch(r"(train|val)_(\d+)\.jpg", image.file_name).groups()
        scene = render_scene(seed, split_name, int(index))
        fine = torch.from_numpy(occupancy([o.mask for o in scene.objects], image.resized_hw))  # 256 x 256
        sub = fine.view(GRID, SUB, GRID, SUB).permute(0, 2, 1, 3).reshape(GRID, GRID, SUB * SUB) > 0.5
        mixed = sub.any(-1) & ~sub.all(-1)
        embedding, early = (torch.from_numpy(np.asarray(a, np.float32)) for a in namespace.read(image.entry))
        pixels, _, _ = prepare(demo / "images" / image.file_name)
        plane = torch.from_numpy(pixels).float().view(3, FINE, SUB, FINE, SUB).mean(dim=(2, 4)) / 255.0
        # stride-4 image, each cell's 4 x 4 x 3 block as one vector: 48 x 64 x 64
        blocks = plane.view(3, GRID, SUB, GRID, SUB).permute(0, 2, 4, 1, 3).reshape(3 * SUB * SUB, GRID, GRID)
        cell = fine.view(GRID, SUB, GRID, SUB).mean(dim=(1, 3))[None]
        grids = {
            "embedding": embedding,
            "early": early,
            "both, 3 x 3": neighbourhood(torch.cat([embedding, early])),
            "cell occupancy, 3 x 3": neighbourhood(cell),
            "image 4 px, 3 x 3": neighbourhood(blocks),
        }
        for name, grid in grids.items():
            inputs.setdefault(name, []).append(grid.permute(1, 2, 0)[mixed])
        inputs.setdefault("target", []).append(sub[mixed].float())
        upsampled = F.interpolate(cell[None], size=(FINE, FINE), mode="bilinear", align_corners=False)[0, 0]
        up = upsampled.view(GRID, SUB, GRID, SUB).permute(0, 2, 1, 3).reshape(GRID, GRID, SUB * SUB)
        inputs.setdefault("bilinear", []).append(up[mixed])
    out = {name: torch.cat(parts) for name, parts in inputs.items()}
    out["both"] = torch.cat([out["embedding"], out["early"]], dim=1)
    # What each source adds to a perfect cell-level map: the sub-cell information proper.
    for source in ("both, 3 x 3", "image 4 px, 3 x 3"):
        out[f"cell occupancy + {source}"] = torch.cat([out["cell occupancy, 3 x 3"], out[source]], dim=1)
    return out


def scores(probability: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    predicted = probability > 0.5
    truth = target > 0.5
    union = (predicted | truth).sum(-1).clamp_min(1)
    return {
        "subcell_accuracy": round((predicted == truth).float().mean().item(), 4),
        "mean_iou_4x4": round(((predicted & truth).sum(-1) / union).float().mean().item(), 4),
    }


def fit_probe(train_x: torch.Tensor, train_y: torch.Tensor, epochs: int, seed: int) -> torch.nn.Module:
    """A two-layer MLP, inputs standardised on the train cells: D -> 256 -> 16 sub-cell logits."""
    torch.manual_seed(seed)
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    model = torch.nn.Sequential(torch.nn.Linear(train_x.shape[1], 256), torch.nn.GELU(), torch.nn.Linear(256, 16))
    optimiser = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    x = (train_x - mean) / std
    for _ in range(epochs):
        for batch in torch.randperm(len(x)).split(512):
            loss = F.binary_cross_entropy_with_logits(model(x[batch]), train_y[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    model.eval()
    return torch.nn.Sequential(_Standardise(mean, std), model)


class _Standardise(torch.nn.Module):
    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.mean, self.std = mean, std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", default="data/features.zarr", help="the demo's feature store")
    parser.add_argument("--demo", type=Path, default=Path("data/demo"), help="the demo dataset folder")
    parser.add_argument("--seed", type=int, default=0, help="the demo's seed (its scenes are redrawn)")
    parser.add_argument("--train-images", type=int, default=288, help="train images to fit the probes on")
    parser.add_argument("--epochs", type=int, default=6, help="probe training epochs")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="folder for the JSON")
    args = parser.parse_args()
    store = FeatureStore(args.store)
    data = {}
    for split_name in ("train", "val"):
        namespace = resolve_namespace(store, split_name, None)
        split = load_split(namespace, split_name, args.demo / f"{split_name}.json")
        data[split_name] = samples(split, args.demo, args.seed, namespace, args.train_images)
    train, val = data["train"], data["val"]
    result: dict = {
        "store_encoder": namespace.provenance.get("model_type"),
        "train_cells": len(train["target"]),
        "val_cells": len(val["target"]),
        "share_in_on_mixed_cells": round(val["target"].mean().item(), 4),
        "probes": {},
    }
    prior = train["target"].mean(0).expand_as(val["target"])
    result["probes"]["constant (train prior per sub-cell)"] = scores(prior, val["target"])
    result["probes"]["bilinear upsampling of the true cell occupancy"] = scores(val["bilinear"], val["target"])
    names = [
        "embedding",
        "early",
        "both",
        "both, 3 x 3",
        "image 4 px, 3 x 3",
        "cell occupancy, 3 x 3",
        "cell occupancy + both, 3 x 3",
        "cell occupancy + image 4 px, 3 x 3",
    ]
    for name in names:
        started = time.perf_counter()
        probe = fit_probe(train[name], train["target"], args.epochs, args.seed)
        with torch.inference_mode():
            probability = torch.sigmoid(probe(val[name]))
        result["probes"][name] = {**scores(probability, val["target"]), "fit_s": round(time.perf_counter() - started)}
        print(name, result["probes"][name], flush=True)
    write_and_show(args.out, "subcell_probe", result)


if __name__ == "__main__":
    main()
