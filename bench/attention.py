"""Fused (SDPA) attention against the package's own, on the whole encoder for one 1024 x 1024 image.

    python bench/attention.py [--encoder vit_b] [--repeats 2] [--device cpu] [--out bench/results]

Both encoders carry the same seeded random weights, with the (zero-initialised) relative-position tables and
TinyViT biases filled with random values so that the bias folding is exercised. Reports the best of
`--repeats` forward times each way (alternating) and the largest absolute difference of both outputs, fp32.
Writes `<out>/attention_<encoder>_<device>.json`.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch
from torch import nn

from pipeline.devices import resolve_device
from pipeline.hqsam.encoder import build_encoder, identity_for

from results_file import write_and_show  # bench/, next to this script


def randomise_biases(encoder: nn.Module, seed: int = 0) -> None:
    """Random rel-pos tables / TinyViT biases (std 0.5), the same for the same seed."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in encoder.named_parameters():
            if "rel_pos" in name or "attention_biases" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    encoder.eval()  # TinyViT caches its biases when switched to eval


def timed(encoder: nn.Module, x: torch.Tensor, device: torch.device) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Seconds of one forward, the embedding (1 x 256 x 64 x 64) and the early feature (1 x 64 x 64 x C)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    with torch.inference_mode():
        embedding, interm = encoder(x)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started, embedding, interm[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", default="vit_b", help="encoder variant (default vit_b)")
    parser.add_argument("--repeats", type=int, default=2, help="timed forwards each way, best kept (default 2)")
    parser.add_argument("--device", default="cpu", help="auto, cuda or cpu (default cpu)")
    parser.add_argument(
        "--out", type=Path, default=Path("bench/results"), help="folder for the JSON (default bench/results)"
    )
    args = parser.parse_args()

    device = resolve_device(args.device)
    identity = identity_for(args.encoder, None)
    encoders = {}
    for fused in (False, True):
        encoder = build_encoder(identity, None, fused_attention=fused)
        randomise_biases(encoder)
        encoders["sdpa" if fused else "package"] = encoder.to(device)
    x = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(0)).to(device)
    seconds: dict[str, list[float]] = {"package": [], "sdpa": []}
    outputs = {}
    for _ in range(args.repeats):
        for name, encoder in encoders.items():
            took, embedding, early = timed(encoder, x, device)
            seconds[name].append(took)
            outputs[name] = (embedding, early)
    (package_embedding, package_early), (sdpa_embedding, sdpa_early) = outputs["package"], outputs["sdpa"]
    result = {
        "encoder": args.encoder,
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)",
        "image": "1 x 3 x 1024 x 1024, fp32",
        "package_attention_s": round(min(seconds["package"]), 3),
        "sdpa_attention_s": round(min(seconds["sdpa"]), 3),
        "speedup": round(min(seconds["package"]) / min(seconds["sdpa"]), 3),
        "all_s": {name: [round(s, 3) for s in times] for name, times in seconds.items()},
        "max_abs_diff_embedding": float((package_embedding - sdpa_embedding).abs().max()),
        "max_abs_embedding": float(package_embedding.abs().max()),
        "max_abs_diff_early": float((package_early - sdpa_early).abs().max()),
        "max_abs_early": float(package_early.abs().max()),
        "torch": torch.__version__,
    }
    write_and_show(args.out, f"attention_{args.encoder}_{device.type}", result)


if __name__ == "__main__":
    main()
