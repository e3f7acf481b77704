"""Extraction at the speed of the GPU: encoder-only and end-to-end `extract` throughput, TFLOP/s, share of peak.

    python bench/gpu_extract.py [--encoders vit_tiny,vit_b,vit_l,vit_h] [--dtypes bf16,fp32]
                                [--batch-sizes 16,64] [--images 256] [--compile] [--device auto]
                                [--out bench/results]

For every encoder (random weights), dtype and batch size: the encoder alone on inputs already on the device,
then a cold `extract` of the same demo images into a fresh store (reading, hashing, decoding, encoder build
and writing included; it runs bf16 where the device has it, so fp32 rows have no end-to-end figure).
FLOPs per image are counted once per encoder with `torch.utils.flop_counter` on the meta device, with the
package's own attention: the nominal work, 2 FLOPs per multiply-add. The device's peak comes from its name.
Writes `<out>/gpu_extract_<device>[_compiled].json` after every configuration, so a run cut short keeps
what it measured.
On CPU it runs too (`--encoders vit_tiny --images 4`), to check the script, not for figures.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline.demo_data import make_demo_dataset
from pipeline.devices import resolve_device
from pipeline.hqsam.encoder import FeatureEncoder, build_encoder, identity_for
from pipeline.extraction.config import ExtractConfig
from pipeline.extraction.extract import run_extract
from pipeline.extraction.encoder_runner import default_batch_size
from pipeline.extraction.writers import writer_threads
from pipeline.images import prepare

from results_file import slug, write_result  # bench/, next to this script

# Dense peak TFLOP/s (no sparsity) by device-name fragment, most specific first: bf16, and TF32 for fp32.
PEAK_TFLOPS = [
    ("H100 PCIe", {"bf16": 756.0, "fp32": 378.0}),
    ("H100 NVL", {"bf16": 835.0, "fp32": 418.0}),
    ("H100", {"bf16": 989.4, "fp32": 494.7}),  # SXM
    ("H200", {"bf16": 989.4, "fp32": 494.7}),
    ("A100", {"bf16": 312.0, "fp32": 156.0}),
    ("L40S", {"bf16": 362.1, "fp32": 183.0}),
]


def peak_tflops(device_name: str, dtype: str) -> float | None:
    return next((peaks[dtype] for fragment, peaks in PEAK_TFLOPS if fragment in device_name), None)


def flops_per_image(model_type: str) -> float:
    """FLOPs of one 1024 x 1024 image through the encoder, counted on the meta device (nothing is computed)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from segment_anything_hq import sam_model_registry

    if model_type == "vit_tiny":  # TinyViT calls .item() while building: build it for real (it is small)
        encoder = sam_model_registry[model_type]().image_encoder.to("meta")
    else:
        with torch.device("meta"):
            encoder = sam_model_registry[model_type]().image_encoder
    with torch.device("meta"), FlopCounterMode(display=False) as counter, torch.no_grad():
        encoder.eval()(torch.empty(1, 3, 1024, 1024))
    return float(counter.get_total_flops())


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def encoder_only(
    model: FeatureEncoder,
    pixels: torch.Tensor,
    resized: torch.Tensor,
    batch_size: int,
    dtype: str,
    device: torch.device,
) -> dict:
    """Images/s of the encoder on inputs already on the device (one warm-up batch), and its peak memory."""
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16" and device.type == "cuda")

    def run(start: int) -> None:
        with torch.inference_mode(), autocast:
            model(pixels[start : start + batch_size], resized[start : start + batch_size])

    run(0)
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    for start in range(0, len(pixels), batch_size):
        run(start)
    synchronize(device)
    seconds = time.perf_counter() - started
    result = {"encoder_images_per_s": round(len(pixels) / seconds, 2)}
    if device.type == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return result


def prepared_inputs(data: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The demo's train images decoded and resized as `extract` does: N x 3 x 1024 x 1024 uint8, N x 2."""
    with ThreadPoolExecutor(os.cpu_count()) as pool:  # Pillow decodes and resizes without the GIL
        prepared = list(pool.map(prepare, sorted((data / "images").glob("train_*.jpg"))))
    return torch.stack([torch.from_numpy(p[0]) for p in prepared]), torch.tensor([p[2] for p in prepared])


def measure(
    model_type: str,
    dtype: str,
    batch_size: int,
    inputs: tuple[torch.Tensor, torch.Tensor],
    data: Path,
    scratch: Path,
    device: torch.device,
    fused: bool,
    compile_encoder: bool,
) -> dict:
    pixels, resized = (t.to(device) for t in inputs)
    model = FeatureEncoder(build_encoder(identity_for(model_type, None), None, fused_attention=fused)).to(device)
    if compile_encoder:  # as extract compiles: static shapes, so the batch size must divide the image count
        model = torch.compile(model, dynamic=False)
    result = encoder_only(model, pixels, resized, batch_size, dtype, device)
    del model, pixels
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if dtype == "bf16" or device.type == "cpu":  # extract's own precision
        store = scratch / f"{model_type}-{dtype}-{batch_size}-{time.time_ns()}.zarr"
        config = ExtractConfig(
            images=data / "images",
            store=str(store),
            encoder=model_type,
            annotations=data / "train.json",
            device=device.type,
            batch_size=batch_size,
            fused_attention=fused,
            compile=compile_encoder,
        )
        summary = run_extract(config)
        result.update(
            extract_images_per_s=round(summary.computed / summary.wall_s, 2),
            # The one-off encoder build (random init on the CPU: seconds for vit_h) left out: the steady rate.
            extract_steady_images_per_s=round(summary.computed / (summary.wall_s - summary.build_s), 2),
            extract_build_s=round(summary.build_s, 2),
            extract_encoder_images_per_s=round(summary.computed / summary.encoder_s, 2),
            extract_data_wait_share=round(summary.data_wait_s / summary.wall_s, 4),
            extract_wall_s=round(summary.wall_s, 2),
        )
        result["extract_steady_over_encoder"] = round(
            result["extract_steady_images_per_s"] / result["encoder_images_per_s"], 3
        )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoders", default="vit_tiny,vit_b,vit_l,vit_h", help="comma-separated encoder variants")
    parser.add_argument("--dtypes", default="bf16", help="comma-separated: bf16, fp32 (default bf16)")
    parser.add_argument(
        "--batch-sizes", default="default", help="comma-separated batch sizes, or 'default' (extract's)"
    )
    parser.add_argument("--images", type=int, default=256, help="demo images per configuration (default 256)")
    parser.add_argument("--no-fused-attention", action="store_true", help="the package's own attention instead")
    parser.add_argument("--compile", action="store_true", help="torch.compile the encoder, as `extract --compile`")
    parser.add_argument("--device", default="auto", help="auto, cuda or cpu (default auto)")
    parser.add_argument(
        "--out", type=Path, default=Path("bench/results"), help="folder for the JSON (default bench/results)"
    )
    args = parser.parse_args()

    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    fused = not args.no_fused_attention
    torch.set_float32_matmul_precision("high")  # fp32 rows use TF32 tensor cores, as their peak assumes
    dtypes = args.dtypes.split(",") if device.type == "cuda" else ["fp32"]  # CPU runs fp32 whatever is asked
    peaks = {dtype: peak_tflops(name, dtype) for dtype in dtypes}
    print(f"device {name}: peak dense TFLOP/s {peaks} (None: not in the table)")
    result_name = f"gpu_extract_{slug(name)}{'_compiled' if args.compile else ''}"
    report = {
        "device": name,
        "peak_tflops": peaks,
        "images": args.images,
        "fused_attention": fused,
        "flops_convention": "2 FLOPs per multiply-add, package attention, one 1024 x 1024 image",
        "compiled": args.compile,
        "writer_threads": writer_threads(device),
        "torch": torch.__version__,
        "results": [],
    }
    with tempfile.TemporaryDirectory() as scratch:
        data = Path(scratch) / "demo"
        make_demo_dataset(data, seed=0, n_train=args.images, n_val=1)
        inputs = prepared_inputs(data)
        for model_type in args.encoders.split(","):
            flops = flops_per_image(model_type)
            sizes = (
                [default_batch_size(model_type, device, fused)]
                if args.batch_sizes == "default"
                else [int(b) for b in args.batch_sizes.split(",")]
            )
            for dtype in dtypes:
                for batch_size in sizes:
                    row = {
                        "encoder": model_type,
                        "dtype": dtype,
                        "batch_size": batch_size,
                        "tflop_per_image": round(flops / 1e12, 4),
                    }
                    try:
                        row.update(
                            measure(
                                model_type, dtype, batch_size, inputs, data, Path(scratch), device, fused, args.compile
                            )
                        )
                    except torch.OutOfMemoryError:
                        row["error"] = "out of memory"
                        torch.cuda.empty_cache()
                    for kind in ("encoder", "extract_steady"):
                        rate = row.get(f"{kind}_images_per_s")
                        if rate is not None:
                            row[f"{kind}_tflops"] = round(rate * flops / 1e12, 1)
                            if peaks[dtype]:
                                row[f"{kind}_share_of_peak"] = round(rate * flops / 1e12 / peaks[dtype], 3)
                    report["results"].append(row)
                    print(json.dumps(row), flush=True)
                    target = write_result(args.out, result_name, report)
    print(f"written to {target}")


if __name__ == "__main__":
    main()
