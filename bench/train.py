"""What the store buys `train`: one epoch from the store against one epoch with the encoder in the loop.

    python bench/train.py [--images 16] [--large 32] [--out bench/results]

Both epochs run the same `train_one_epoch` with the same refiner, optimizer and boxes; only the
dataset differs: stored features (one store read per image) or features computed on the fly (decode,
resize, HQ-SAM encoder forward per image, as a training script without a cache would). Peak memory of
a store epoch is measured in fresh processes on stores of `--images` and `--large` images.
Writes `<out>/train_<device>.json`.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch

from pipeline.config import TrainConfig
from pipeline.demo_data import make_demo_dataset
from pipeline.encoder import FeatureEncoder, build_encoder, identity_for
from pipeline.extract import ExtractConfig, run_extract
from pipeline.features import FeatureDataset, feature_loader
from pipeline.images import prepare
from pipeline.train import TrainProgress, prepare_training, train_one_epoch

from results_file import write_and_show  # bench/, next to this script


class EncoderInTheLoop(FeatureDataset):
    """The same items as FeatureDataset, but each image is decoded and encoded on every read."""

    def __init__(self, base: FeatureDataset, image_root: Path, encoder: FeatureEncoder) -> None:
        super().__init__(base.store_url, base.fingerprint, base.images)
        self.image_root = image_root
        self.encoder = encoder

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = self.images[index]
        pixels, _, resized = prepare(self.image_root / image.file_name)
        with torch.inference_mode():
            embedding, early = self.encoder(torch.from_numpy(pixels)[None], torch.tensor([resized]))
        return {"index": index, "embedding": embedding[0].half().numpy(), "early": early[0].half().numpy()}


def one_epoch(
    store: str, annotations: Path, wrap: Callable[[FeatureDataset], FeatureDataset] | None = None
) -> dict[str, float]:
    """Time one training epoch (default settings, CPU) and return seconds, boxes/s and data-wait share.

    The run is set up exactly as `refine train` sets it up; `wrap` turns its stored-feature dataset into
    the one to train from (the encoder in the loop).
    """
    # prepare_training only reads: no output folder is needed, the epoch is run here.
    t = prepare_training(TrainConfig(store=store, annotations=annotations, epochs=1, device="cpu", workers=0))
    if wrap is not None:
        t.train_loader = feature_loader(wrap(t.train_loader.dataset), t.config.batch_size, 0, t.sampler)
    reports: list[TrainProgress] = []
    started = time.perf_counter()
    train_one_epoch(
        t.step_model,
        t.optimizer,
        t.scaler,
        t.train_loader,
        t.train_split.images,
        t.config,
        0,
        t.device,
        t.amp_dtype,
        t.learning_rate,
        reports.append,
    )
    seconds = time.perf_counter() - started
    return {
        "seconds": round(seconds, 3),
        "boxes_per_s": round(reports[-1].boxes_per_s, 1),
        "data_wait_share": round(reports[-1].data_wait_share, 4),
        "images": len(t.train_split.images),
    }


def peak_memory_epoch(store: str, annotations: Path) -> dict[str, float]:
    """Runs in a fresh process: one store epoch, then the process's peak resident memory."""
    result = one_epoch(store, annotations)
    result["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return result


def extract(images: Path, annotations: Path, store: Path) -> None:
    run_extract(ExtractConfig(images=images, store=str(store), annotations=annotations, device="cpu"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=16, help="training images for the epoch comparison (default 16)")
    parser.add_argument(
        "--large", type=int, default=32, help="images of the larger store for the memory check (default 32)"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("bench/results"), help="folder for the JSON (default bench/results)"
    )
    parser.add_argument("--memory-run", nargs=2, metavar=("STORE", "ANNOTATIONS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_run:
        print(json.dumps(peak_memory_epoch(args.memory_run[0], Path(args.memory_run[1]))))
        return

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        make_demo_dataset(root / "demo", seed=0, n_train=args.large, n_val=1)
        coco = json.loads((root / "demo" / "train.json").read_text())
        small = {**coco, "images": coco["images"][: args.images]}
        small["annotations"] = [a for a in coco["annotations"] if a["image_id"] in {i["id"] for i in small["images"]}]
        small_annotations = root / "small.json"
        small_annotations.write_text(json.dumps(small))
        small_store, large_store = root / "small.zarr", root / "large.zarr"
        extract(root / "demo" / "images", small_annotations, small_store)
        extract(root / "demo" / "images", root / "demo" / "train.json", large_store)

        from_store = one_epoch(str(small_store), small_annotations)
        encoder = FeatureEncoder(build_encoder(identity_for("vit_tiny", None), None))
        in_loop = one_epoch(
            str(small_store),
            small_annotations,
            lambda stored: EncoderInTheLoop(stored, root / "demo" / "images", encoder),
        )
        memory = {}
        for name, store, annotations in (
            ("small", small_store, small_annotations),
            ("large", large_store, root / "demo" / "train.json"),
        ):
            run = subprocess.run(
                [sys.executable, __file__, "--memory-run", str(store), str(annotations)],
                capture_output=True,
                text=True,
                check=True,
            )
            memory[name] = json.loads(run.stdout.strip().splitlines()[-1])

    result = {
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "encoder": "vit_tiny (random init)",
        "epoch_from_store": from_store,
        "epoch_with_encoder_in_loop": in_loop,
        "store_speedup": round(in_loop["seconds"] / from_store["seconds"], 1),
        "peak_memory": memory,
        "peak_memory_growth_mib": round(memory["large"]["peak_rss_mib"] - memory["small"]["peak_rss_mib"], 1),
        "torch": torch.__version__,
    }
    write_and_show(args.out, "train_cpu", result)


if __name__ == "__main__":
    main()
