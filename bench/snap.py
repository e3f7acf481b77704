"""Zero-shot snap against the refiner: boxes/s on CPU, on the same entries and the same coarse boxes.

    python bench/snap.py [--images 8] [--rounds 2] [--out bench/results]

The demo's train images are extracted with vit_tiny (random weights); their ground-truth boxes, jittered
by the OA-MIL protocol at training's default noise (r = 0.2, seeded per image), are the coarse boxes.
vit_h's encoder is too slow to run here, so for vit_h the same entries are written again, with random
features of its shapes (early feature 1280 x 64 x 64, at the real scales), into the namespace of vit_h's
random init: `build_snapper` then builds the real vit_h prompt encoder and decoder (the whole model at
random init, the image encoder dropped), exactly as for a store vit_h extracted. Each image goes through
`snap_boxes` (one read, one decoder call), `snap_boxes` with its masks encoded as COCO RLE (`--masks`),
and `refine_boxes` with a random-init `similarity_cascade` refiner of the same early channels (a trained
one runs the same computation). Each figure is the fastest of `--rounds` passes over all images, after
one untimed image: other jobs share these cores. Writes `<out>/snap.json`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from pipeline.inference.apply import image_entries
from pipeline.inference.core import refine_boxes
from pipeline.boxes import coco_to_xyxy, jitter_boxes, noise_generator
from pipeline.demo_data import make_demo_dataset
from pipeline.hqsam.encoder import ENCODERS, identity_for
from pipeline.extraction.config import ExtractConfig
from pipeline.extraction.extract import run_extract
from pipeline.model.base import RefinerConfig
from pipeline.model.registry import build_refiner
from pipeline.inference.snap import DECODER_BATCH, masks_to_rle, snap_boxes
from pipeline.inference.snapper import build_snapper
from pipeline.store import Entry, FeatureStore, Namespace
from pipeline.store.writer import SegmentWriter

from results_file import write_and_show  # bench/, next to this script

CPU = torch.device("cpu")
NOISE = 0.2


def coarse_work(namespace: Namespace, annotations: Path) -> list[tuple[str, Entry, Tensor]]:
    """(key, entry, N x 4 coarse boxes in original pixels) per image of the dataset."""
    coco = json.loads(annotations.read_text())
    by_image: dict[int, list[list[float]]] = {}
    for annotation in coco["annotations"]:
        by_image.setdefault(annotation["image_id"], []).append(annotation["bbox"])
    work = []
    for image_id, (_, entry) in image_entries(namespace, "train").items():
        gt = coco_to_xyxy(by_image[image_id])
        coarse = jitter_boxes(gt, entry.original_size, NOISE, noise_generator(0, image_id, None))
        work.append((entry.key, entry, coarse))
    return work


def vit_h_shaped(store: FeatureStore, work: list[tuple[str, Entry, Tensor]]) -> Namespace:
    """The entries of `work` written again, with random features of vit_h's shapes, into the namespace of
    vit_h's random init (its provenance says they are synthetic)."""
    identity = identity_for("vit_h", None)
    provenance = {
        **identity.provenance(),
        "weights_description": "synthetic random features of vit_h's shapes (bench/snap.py), not an extraction",
    }
    namespace = Namespace.ensure(store, provenance)
    channels = ENCODERS["vit_h"].early_channels
    writer = SegmentWriter(namespace, channels, shard_rows=1, planes=False)
    rng = np.random.default_rng(0)
    for key, entry, _ in work:
        writer.write_batch(
            [key],
            rng.standard_normal((1, 256, 64, 64), dtype=np.float32).astype(np.float16),
            (rng.standard_normal((1, channels, 64, 64), dtype=np.float32) * 0.003).astype(np.float16),
            [entry.original_size],
            [entry.resized_size],
        )
    return namespace


def boxes_per_second(run: Callable[[Entry, Tensor], object], work: list[tuple[Entry, Tensor]], rounds: int) -> dict:
    """The fastest of `rounds` passes of `run` over every image's boxes (after one untimed image)."""
    run(*work[0])
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        for entry, boxes in work:
            run(entry, boxes)
        best = min(best, time.perf_counter() - started)
    count = sum(len(boxes) for _, boxes in work)
    return {
        "seconds": round(best, 3),
        "boxes_per_s": round(count / best, 2),
        "ms_per_box": round(1000 * best / count, 1),
    }


def measure(namespace: Namespace, work: list[tuple[Entry, Tensor]], rounds: int) -> dict:
    """Snap (boxes; boxes and RLE masks) and the refiner on the same entries and boxes."""
    started = time.perf_counter()
    snapper = build_snapper(namespace)
    build_s = time.perf_counter() - started
    early_channels = ENCODERS[namespace.provenance["model_type"]].early_channels
    refiner = build_refiner("similarity_cascade", RefinerConfig(early_channels)).eval()

    def snap_with_masks(entry: Entry, boxes: Tensor) -> None:
        snapped = snap_boxes(snapper, namespace, entry, boxes, CPU, return_masks=True)
        assert snapped.masks is not None
        masks_to_rle(snapped.masks)

    snap = boxes_per_second(lambda entry, boxes: snap_boxes(snapper, namespace, entry, boxes, CPU), work, rounds)
    refine = boxes_per_second(lambda entry, boxes: refine_boxes(refiner, namespace, entry, boxes, CPU), work, rounds)
    return {
        "snapper_build_s": round(build_s, 2),
        "snap": snap,
        "snap_with_rle_masks": boxes_per_second(snap_with_masks, work, rounds),
        "refiner": refine,
        "refiner_over_snap": round(refine["boxes_per_s"] / snap["boxes_per_s"], 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8, help="demo train images (default 8)")
    parser.add_argument("--rounds", type=int, default=2, help="timed passes; the fastest counts (default 2)")
    parser.add_argument(
        "--out", type=Path, default=Path("bench/results"), help="folder for the JSON (default bench/results)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        make_demo_dataset(root / "demo", seed=0, n_train=args.images, n_val=1)
        annotations = root / "demo" / "train.json"
        store_path = root / "features.zarr"
        config = ExtractConfig(
            images=root / "demo" / "images", store=str(store_path), annotations=annotations, device="cpu"
        )
        fingerprint = run_extract(config).fingerprint
        store = FeatureStore(store_path)
        tiny = Namespace.open(store, fingerprint)
        keyed = coarse_work(tiny, annotations)
        work = [(entry, boxes) for _, entry, boxes in keyed]
        vit_h = vit_h_shaped(store, keyed)
        vit_h_work = [(vit_h.entries()[key], boxes) for key, _, boxes in keyed]
        sizes = [entry.original_size for entry, _ in work]
        result = {
            "device": "cpu",
            "threads": torch.get_num_threads(),
            "images": len(work),
            "boxes": sum(len(boxes) for _, boxes in work),
            "image_sizes": f"{min(h * w for h, w in sizes) / 1e6:.2f} to {max(h * w for h, w in sizes) / 1e6:.2f} MP",
            "decoder_batch": DECODER_BATCH,
            "vit_tiny": measure(tiny, work, args.rounds),
            "vit_h_shapes": measure(vit_h, vit_h_work, args.rounds),
            "weights": "random init (vit_h: random features of its shapes); speed does not depend on the weights",
            "torch": torch.__version__,
        }
    write_and_show(args.out, "snap", result)


if __name__ == "__main__":
    main()
