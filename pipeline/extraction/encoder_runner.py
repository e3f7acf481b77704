"""`extract`'s encoder side: how many images per call, and the runner that encodes a batch and starts its
features' trip to the host without waiting for it."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from pipeline.devices import autocast
from pipeline.hqsam.encoder import EncoderIdentity, FeatureEncoder, build_encoder

CPU_BATCH = 4
# Largest default batch on CUDA: beyond it throughput no longer grows, while shards and host buffers do.
MAX_CUDA_BATCH = 64
# Peak CUDA memory per image in the encoder (bf16, fused attention), with about 2x headroom over an estimate
# of one block's activations plus the kept early features.
GIB_PER_IMAGE = {"vit_tiny": 0.25, "vit_b": 0.3, "vit_l": 0.4, "vit_h": 0.5}
# Without fused attention every global block also materialises heads x 4096 x 4096 scores (bf16 + fp32 softmax).
GIB_ATTENTION_MATRIX = {"vit_tiny": 0.0, "vit_b": 1.5, "vit_l": 2.0, "vit_h": 2.0}


def default_batch_size(model_type: str, device: torch.device, fused_attention: bool = True) -> int:
    """Images per encoder call: 4 on CPU; on CUDA the largest power of two whose activations fit in 70% of
    the free device memory, at most `MAX_CUDA_BATCH`."""
    if device.type != "cuda":
        return CPU_BATCH
    free_bytes, _ = torch.cuda.mem_get_info(device)
    per_image = GIB_PER_IMAGE[model_type] + (0.0 if fused_attention else GIB_ATTENTION_MATRIX[model_type])
    fits = int(0.7 * free_bytes / 2**30 / per_image)
    return max(1, min(MAX_CUDA_BATCH, 1 << max(0, fits.bit_length() - 1)))


class EncoderRunner:
    """Runs the encoder on a batch, under autocast to `amp` (None: fp32), and starts the float16 features' trip
    to the host without waiting for it.

    On CUDA the inputs come from pinned memory and the outputs go to pinned memory behind an event that
    the writer thread waits on, so the GPU is already on the next batch while this one travels. The
    encoder's own time comes from CUDA events (CPU time would only count kernel launches).
    With `fixed_batch` every call gets exactly that many images (padded with empty ones): a compiled
    encoder then never recompiles for a short batch.
    """

    def __init__(
        self, model: torch.nn.Module, device: torch.device, amp: torch.dtype | None, fixed_batch: int | None
    ) -> None:
        self.model = model
        self.device = device
        self.amp = amp
        self.fixed_batch = fixed_batch
        self.cpu_seconds = 0.0
        self.cuda_events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def __call__(
        self, pixels: torch.Tensor, resized: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.cuda.Event | None]:
        """pixels: B x 3 x 1024 x 1024 uint8, resized: B x 2 -> host float16 B x 256 x 64 x 64, B x C x 64 x 64,
        and the event after which they hold their values (None: they already do)."""
        count = len(pixels)
        if self.fixed_batch is not None and count < self.fixed_batch:
            pixels = torch.cat([pixels, pixels.new_zeros(self.fixed_batch - count, *pixels.shape[1:])])
            resized = torch.cat([resized, resized.new_ones(self.fixed_batch - count, 2)])
        on_cuda = self.device.type == "cuda"
        started = time.perf_counter()
        if on_cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
        with torch.inference_mode(), autocast(self.device, self.amp):
            outputs = self.model(pixels.to(self.device, non_blocking=True), resized.to(self.device, non_blocking=True))
        if not on_cuda:
            self.cpu_seconds += time.perf_counter() - started
            embedding, early = (t[:count].to(torch.float16) for t in outputs)
            return embedding, early, None
        end.record()
        self.cuda_events.append((begin, end))
        host = []
        for output in outputs:
            output = output[:count].to(torch.float16)
            copy = torch.empty(output.shape, dtype=torch.float16, pin_memory=True)
            host.append(copy.copy_(output, non_blocking=True))
        ready = torch.cuda.Event()
        ready.record()
        return host[0], host[1], ready

    def seconds(self) -> float:
        """Time the encoder has run so far (on CUDA: waits for the device)."""
        if self.cuda_events:
            self.cuda_events[-1][1].synchronize()
        return self.cpu_seconds + sum(begin.elapsed_time(end) for begin, end in self.cuda_events) / 1000


def build_runner(
    identity: EncoderIdentity,
    checkpoint: Path | None,
    seed: int,
    device: torch.device,
    amp: torch.dtype | None,
    batch_size: int,
    fused_attention: bool = True,
    compiled: bool = False,
) -> EncoderRunner:
    """The HQ-SAM encoder of `identity` on `device` under autocast to `amp` (None: fp32), optionally compiled
    (then for batches of `batch_size`)."""
    model: torch.nn.Module = FeatureEncoder(
        build_encoder(identity, checkpoint, seed, fused_attention=fused_attention)
    ).to(device)
    if compiled:
        model = torch.compile(model, dynamic=False)
    return EncoderRunner(model, device, amp, batch_size if compiled else None)


def autocast_name(amp: torch.dtype | None) -> str:
    """How a segment's commit names the encoder's autocast."""
    return "bf16" if amp == torch.bfloat16 else "off"


def computed_with(runner: EncoderRunner, fused_attention: bool, compiled: bool) -> dict:
    """Recorded in each segment's commit: how its features were computed (not what they mean)."""
    return {
        "device": torch.cuda.get_device_name(runner.device) if runner.device.type == "cuda" else "cpu",
        "autocast": autocast_name(runner.amp),
        "fused_attention": fused_attention,
        "compiled": compiled,
    }
