"""Extraction throughput on the same images: bare encoder forward, cold `extract`, warm re-run, each with the
encoder in fp32 (`--amp off`) and in extract's default precision (`--amp auto`: bf16 where native).

    python bench/extract.py [--images 24] [--encoder vit_tiny] [--device auto] [--out bench/results]

Writes `<out>/extract_<encoder>_<device>.json`. The bare encoder gets its inputs decoded and resized in
advance; `extract` pays for everything (hashing, decoding, encoder build, writing) on a fresh store.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch

from pipeline.demo_data import make_demo_dataset
from pipeline.devices import autocast, native_bf16, resolve_device, resolve_encoder_amp
from pipeline.hqsam.encoder import FeatureEncoder, build_encoder, identity_for
from pipeline.extraction.config import ExtractConfig
from pipeline.extraction.extract import run_extract
from pipeline.extraction.encoder_runner import autocast_name, default_batch_size
from pipeline.images import prepare

from results_file import write_and_show  # bench/, next to this script


def bare_encoder_rate(
    files: list[Path], model_type: str, device: torch.device, amp: torch.dtype | None, batch_size: int
) -> float:
    """Images per second of the encoder alone, inputs prepared beforehand, one warm-up batch."""
    prepared = [prepare(f) for f in files]
    pixels = torch.stack([torch.from_numpy(p[0]) for p in prepared])
    resized = torch.tensor([p[2] for p in prepared])
    model = FeatureEncoder(build_encoder(identity_for(model_type, None), None)).to(device)

    def run(start: int, stop: int) -> None:
        with torch.inference_mode(), autocast(device, amp):
            embedding, early = model(pixels[start:stop].to(device), resized[start:stop].to(device))
            embedding.to(torch.float16).cpu(), early.to(torch.float16).cpu()

    run(0, min(batch_size, len(files)))  # warm-up: allocator, kernels
    started = time.perf_counter()
    for start in range(0, len(files), batch_size):
        run(start, start + batch_size)
    return len(files) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=24, help="number of demo images to extract (default 24)")
    parser.add_argument("--encoder", default="vit_tiny", help="encoder variant (default vit_tiny)")
    parser.add_argument("--device", default="auto", help="auto, cuda or cpu (default auto)")
    parser.add_argument("--workers", type=int, default=None, help="extract's DataLoader workers (default: extract's)")
    parser.add_argument(
        "--out", type=Path, default=Path("bench/results"), help="folder for the JSON (default bench/results)"
    )
    args = parser.parse_args()

    device = resolve_device(args.device)
    batch_size = default_batch_size(args.encoder, device)
    result: dict = {
        "encoder": args.encoder,
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "native_bf16": native_bf16(device),
        "batch_size": batch_size,
        "torch": torch.__version__,
    }
    with tempfile.TemporaryDirectory() as scratch:
        data = Path(scratch) / "demo"
        make_demo_dataset(data, seed=0, n_train=args.images, n_val=1)
        files = sorted((data / "images").glob("train_*.jpg"))
        # One run, both precisions: fp32 (`--amp off`) is the anchor of what `auto` buys on this device.
        for amp in ("off", "auto"):
            dtype = resolve_encoder_amp(amp, device)
            bare = bare_encoder_rate(files, args.encoder, device, dtype, batch_size)
            config = ExtractConfig(
                images=data / "images",
                store=str(Path(scratch) / f"features_{amp}.zarr"),
                encoder=args.encoder,
                annotations=data / "train.json",
                device=args.device,
                amp=amp,
                workers=args.workers,
            )
            cold = run_extract(config)
            warm = run_extract(config)
            cold_rate = cold.images / cold.wall_s
            warm_rate = warm.images / warm.wall_s
            result["images"] = cold.images
            result[f"amp_{amp}"] = {
                "autocast": autocast_name(dtype),
                "bare_encoder_images_per_s": round(bare, 3),
                "cold_extract_images_per_s": round(cold_rate, 3),
                "cold_over_bare": round(cold_rate / bare, 3),
                "cold_data_wait_share": round(cold.data_wait_s / cold.wall_s, 4),
                "cold_encoder_build_s": round(cold.build_s, 3),
                "cold_bytes_written": cold.bytes_written,
                "bytes_per_image": round(cold.bytes_written / cold.images),
                "warm_extract_images_per_s": round(warm_rate, 1),
                "warm_over_cold": round(warm_rate / cold_rate, 1),
                "warm_wall_s": round(warm.wall_s, 4),
            }
    result["auto_over_off_cold"] = round(
        result["amp_auto"]["cold_extract_images_per_s"] / result["amp_off"]["cold_extract_images_per_s"], 3
    )
    write_and_show(args.out, f"extract_{args.encoder}_{device.type}", result)


if __name__ == "__main__":
    main()
