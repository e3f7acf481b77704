"""What the store buys `train`: one epoch from the store against one epoch with the encoder in the loop.

    python bench/train.py [--encoder vit_tiny] [--images 16] [--large 32] [--out bench/results]
    python bench/train.py --shapes vit_h [--images 16]     # store epoch only, on entries of vit_h's shapes

Both epochs run the same `prepare_training` and `train_shuffled_epoch` as `refine train`, with the same refiner,
optimizer and boxes; only the dataset differs: stored features (one store read per image) or features
computed on the fly (decode, resize, HQ-SAM encoder forward per image, as a training script without a
cache would). Peak memory of a store epoch is measured in fresh processes on stores of `--images` and
`--large` images (`--large 0` skips it). With `--shapes`, the demo images are extracted with vit_tiny
and their entries written again, with random features of the named encoder's shapes, into a namespace
of their own: the store epoch of an encoder too slow to run here, and how long it waits for data.
Writes `<out>/train_<encoder>_cpu.json` (`train_<shapes>_shapes_cpu.json`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from pipeline.training.config import TrainConfig
from pipeline.demo_data import make_demo_dataset
from pipeline.devices import autocast, native_bf16, resolve_encoder_amp
from pipeline.hqsam.encoder import ENCODERS, FeatureEncoder, build_encoder, identity_for
from pipeline.extraction.config import ExtractConfig
from pipeline.extraction.extract import run_extract
from pipeline.training.data import FeatureDataset
from pipeline.images import prepare, stride4_plane
from pipeline.store import FeatureStore, Namespace
from pipeline.store.writer import SegmentWriter
from pipeline.training.engine import TrainProgress
from pipeline.training.setup import prepare_training
from pipeline.training.train import train_shuffled_epoch

from results_file import peak_rss_mib, write_and_show  # bench/, next to this script


class EncoderInTheLoop(FeatureDataset):
    """The same items as FeatureDataset, but each image is decoded and encoded on every read."""

    def __init__(
        self, base: FeatureDataset, image_root: Path, encoder: FeatureEncoder, amp: torch.dtype | None
    ) -> None:
        super().__init__(base.store_url, base.fingerprint, base.images, base.with_plane)
        self.image_root = image_root
        self.encoder = encoder
        self.amp = amp  # the encoder's autocast, as extract would run it

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = self.images[index]
        pixels, _, resized = prepare(self.image_root / image.file_name)
        with torch.inference_mode(), autocast(torch.device("cpu"), self.amp):
            embedding, early = self.encoder(torch.from_numpy(pixels)[None], torch.tensor([resized]))
        item = {"index": index, "embedding": embedding[0].half().numpy(), "early": early[0].half().numpy()}
        return {**item, "plane": stride4_plane(pixels[None])[0]} if self.with_plane else item


def one_epoch(
    store: str,
    annotations: Path,
    wrap: Callable[[FeatureDataset], FeatureDataset] | None = None,
    fingerprint: str | None = None,
) -> dict[str, float]:
    """Time one training epoch (default settings, CPU) and return seconds, boxes/s and data-wait share.

    The run is set up exactly as `refine train` sets it up; `wrap` turns its stored-feature dataset into
    the one to train from (the encoder in the loop).
    """
    # prepare_training only reads: no output folder is needed, the epoch is run here.
    config = TrainConfig(
        store=store, annotations=annotations, epochs=1, device="cpu", workers=0, fingerprint=fingerprint
    )
    training = prepare_training(config, wrap_train_data=wrap)
    reports: list[TrainProgress] = []
    started = time.perf_counter()
    train_shuffled_epoch(training, 0, reports.append)
    seconds = time.perf_counter() - started
    return {
        "seconds": round(seconds, 3),
        "boxes_per_s": round(reports[-1].boxes_per_s, 1),
        "data_wait_share": round(reports[-1].data_wait_share, 4),
        "images": len(training.train_split.images),
    }


def peak_memory_epoch(store: str, annotations: Path) -> dict[str, float]:
    """Runs in a fresh process: one store epoch, then the process's peak resident memory."""
    result = one_epoch(store, annotations)
    result["peak_rss_mib"] = round(peak_rss_mib(), 1)
    return result


def extract(images: Path, annotations: Path, store: Path, encoder: str = "vit_tiny") -> str:
    """Extract with random weights; returns the namespace's fingerprint."""
    config = ExtractConfig(images=images, store=str(store), annotations=annotations, encoder=encoder, device="cpu")
    return run_extract(config).fingerprint


def with_shapes(store: Path, fingerprint: str, encoder: str, seed: int = 0) -> str:
    """The entries and manifests of one namespace written again into a new one, with random features of
    `encoder`'s shapes (same keys and sizes); returns the new fingerprint."""
    opened = FeatureStore(store)
    source = Namespace.open(opened, fingerprint)
    channels = ENCODERS[encoder].early_channels
    provenance = {
        **source.provenance,
        "fingerprint": f"synthetic-{encoder}",
        "model_type": encoder,
        "early_channels": channels,
        "weights_description": f"synthetic random features of {encoder}'s shapes (bench/train.py)",
    }
    target = Namespace.ensure(opened, provenance)
    writer = SegmentWriter(target, channels, shard_rows=4)
    rng = np.random.default_rng(seed)
    entries = sorted(source.entries().values(), key=lambda entry: entry.key)
    for start in range(0, len(entries), 4):
        batch = entries[start : start + 4]
        writer.write_batch(
            [entry.key for entry in batch],
            rng.standard_normal((len(batch), 256, 64, 64), dtype=np.float32).astype(np.float16),
            (rng.standard_normal((len(batch), channels, 64, 64), dtype=np.float32) * 0.003).astype(np.float16),
            [entry.original_size for entry in batch],
            [entry.resized_size for entry in batch],
            np.stack([source.read_with_plane(entry)[2] for entry in batch]),  # the images' own planes
        )
    for name in source.dataset_names():
        manifest = source.manifest(name)
        target.write_manifest(
            {**manifest, "fingerprint": target.fingerprint, "encoder": encoder, "early_channels": channels}
        )
    return target.fingerprint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", choices=sorted(ENCODERS), default="vit_tiny", help="encoder in the loop")
    parser.add_argument("--shapes", choices=sorted(ENCODERS), help="store epoch only, on entries of these shapes")
    parser.add_argument("--images", type=int, default=16, help="training images for the epoch comparison (default 16)")
    parser.add_argument(
        "--large", type=int, default=32, help="images of the larger store for the memory check (default 32; 0: skip)"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("bench/results"), help="folder for the JSON (default bench/results)"
    )
    parser.add_argument("--memory-run", nargs=2, metavar=("STORE", "ANNOTATIONS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_run:
        print(json.dumps(peak_memory_epoch(args.memory_run[0], Path(args.memory_run[1]))))
        return

    encoder = "vit_tiny" if args.shapes else args.encoder
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        make_demo_dataset(root / "demo", seed=0, n_train=max(args.images, args.large), n_val=1)
        coco = json.loads((root / "demo" / "train.json").read_text())
        small = {**coco, "images": coco["images"][: args.images]}
        small["annotations"] = [a for a in coco["annotations"] if a["image_id"] in {i["id"] for i in small["images"]}]
        small_annotations = root / "small.json"
        small_annotations.write_text(json.dumps(small))
        small_store, large_store = root / "small.zarr", root / "large.zarr"
        fingerprint = extract(root / "demo" / "images", small_annotations, small_store, encoder)
        if args.shapes:
            shaped = with_shapes(small_store, fingerprint, args.shapes)
            result = {
                "device": "cpu",
                "threads": torch.get_num_threads(),
                "shapes": f"{args.shapes} (synthetic: {ENCODERS[args.shapes].early_channels} early channels)",
                "epoch_from_store": min(
                    (one_epoch(str(small_store), small_annotations, fingerprint=shaped) for _ in range(3)),
                    key=lambda r: r["seconds"],
                ),
                "torch": torch.__version__,
            }
            write_and_show(args.out, f"train_{args.shapes}_shapes_cpu", result)
            return

        # The fastest of three: an epoch from the store is short, and another job's burst on these 2 cores
        # can stretch one run several times over.
        from_store = min((one_epoch(str(small_store), small_annotations) for _ in range(3)), key=lambda r: r["seconds"])
        model = FeatureEncoder(build_encoder(identity_for(encoder, None), None))
        # fp32, and extract's default precision where it differs (bf16 on a CPU that has it): the store's gain
        # over each.
        cpu = torch.device("cpu")
        in_loop = {
            amp: one_epoch(
                str(small_store),
                small_annotations,
                lambda stored, amp=amp: EncoderInTheLoop(
                    stored, root / "demo" / "images", model, resolve_encoder_amp(amp, cpu)
                ),
            )
            for amp in ["off"] + (["auto"] if native_bf16(cpu) else [])
        }
        memory = {}
        stores = [("small", small_store, small_annotations)]
        if args.large:
            extract(root / "demo" / "images", root / "demo" / "train.json", large_store, encoder)
            stores.append(("large", large_store, root / "demo" / "train.json"))
        for name, store, annotations in stores:
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
        "encoder": f"{encoder} (random init)",
        "epoch_from_store": from_store,
        "epoch_with_encoder_in_loop": in_loop["off"],
        "store_speedup": round(in_loop["off"]["seconds"] / from_store["seconds"], 1),
        "peak_memory": memory,
        "torch": torch.__version__,
    }
    if "auto" in in_loop:
        result["epoch_with_bf16_encoder_in_loop"] = in_loop["auto"]
        result["store_speedup_over_bf16_encoder"] = round(in_loop["auto"]["seconds"] / from_store["seconds"], 1)
    if "large" in memory:
        result["peak_memory_growth_mib"] = round(memory["large"]["peak_rss_mib"] - memory["small"]["peak_rss_mib"], 1)
    write_and_show(args.out, f"train_{encoder}_cpu", result)


if __name__ == "__main__":
    main()
