"""Mixed precision on CUDA: train the refiner with --amp off / bf16 / fp16 on the demo and compare.

    python bench/train_amp.py [--amps off,bf16,fp16] [--epochs 8] [--n-train 160] [--n-val 40] [--out bench/results]

Makes the demo dataset, extracts it (vit_tiny, random weights) into a fresh store, then for each AMP
mode trains a refiner from the same seed through the same `prepare_training` / `train_and_validate` that
`refine train` runs, and records every epoch's loss (finite or not), the final val metrics and the
training boxes/s. Writes `<out>/train_amp_<device>.json` after every mode.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from pipeline.training.config import TrainConfig
from pipeline.demo_data import make_demo_dataset
from pipeline.devices import resolve_device
from pipeline.extraction.config import ExtractConfig
from pipeline.extraction.extract import run_extract
from pipeline.training.engine import TrainProgress
from pipeline.training.setup import prepare_training
from pipeline.training.train import train_and_validate
from pipeline.model.train_metrics import TrainMetrics

from results_file import slug, write_result  # bench/, next to this script


def train_with(amp: str, store: str, demo: Path, epochs: int, device_name: str) -> dict[str, Any]:
    """Train one refiner with `amp`; its per-epoch losses, final val metrics and training boxes/s."""
    # prepare_training only reads: no output folder is needed, the epochs are run here.
    training = prepare_training(
        TrainConfig(
            store=store,
            annotations=demo / "train.json",
            val_annotations=demo / "val.json",
            epochs=epochs,
            amp=amp,
            device=device_name,
            workers=2,
        )
    )
    losses, rates = [], []
    metrics: TrainMetrics | None = None
    started = time.perf_counter()
    for epoch in range(epochs):
        reports: list[TrainProgress] = []
        metrics = train_and_validate(training, epoch, reports.append)
        losses.append(metrics.train_loss)
        rates.append([report for report in reports if report.phase == "train"][-1].boxes_per_s)
    amp_dtype = training.precision.amp_dtype
    assert metrics is not None  # epochs >= 1
    return {
        "amp": amp,
        "dtype": str(amp_dtype).removeprefix("torch.") if amp_dtype else "float32",
        "losses": [round(loss, 5) for loss in losses],
        "all_finite": all(math.isfinite(loss) for loss in losses),
        "val": metrics.val.to_json(),
        "val_abstained": metrics.val_abstained.to_json(),
        # The first epoch pays for worker start-up and kernel selection: quote the later ones.
        "train_boxes_per_s": round(sum(rates[1:]) / max(len(rates) - 1, 1), 1),
        "wall_s": round(time.perf_counter() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--amps", default="off,bf16,fp16", help="comma-separated --amp modes (default off,bf16,fp16)")
    parser.add_argument("--epochs", type=int, default=8, help="epochs per mode (default 8, as `refine train`)")
    parser.add_argument("--n-train", type=int, default=160, help="demo training images (default 160)")
    parser.add_argument("--n-val", type=int, default=40, help="demo validation images (default 40)")
    parser.add_argument("--device", default="auto", help="auto, cuda or cpu (default auto)")
    parser.add_argument(
        "--out", type=Path, default=Path("bench/results"), help="folder for the JSON (default bench/results)"
    )
    args = parser.parse_args()

    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result: dict[str, Any] = {"device": name, "epochs": args.epochs, "torch": torch.__version__, "modes": []}
    with tempfile.TemporaryDirectory() as scratch:
        demo, store = Path(scratch) / "demo", str(Path(scratch) / "features.zarr")
        make_demo_dataset(demo, seed=0, n_train=args.n_train, n_val=args.n_val)
        for split in ("train", "val"):
            run_extract(
                ExtractConfig(
                    images=demo / "images", store=store, annotations=demo / f"{split}.json", device=args.device
                )
            )
        for amp in args.amps.split(","):
            mode = train_with(amp, store, demo, args.epochs, args.device)
            result["modes"].append(mode)
            print(json.dumps({k: v for k, v in mode.items() if k != "losses"}), flush=True)
            target = write_result(args.out, f"train_amp_{slug(name)}", result)
    print(f"written to {target}")


if __name__ == "__main__":
    main()
