"""Where a stage runs and in which precision: `--device` and `--amp` resolved against the machine.

Shared by every stage that runs a model (extract, train, evaluate, apply), so none of them imports another's code.
"""

from __future__ import annotations

import torch

from pipeline import distributed
from pipeline.errors import RefineError


def resolve_device(device: str) -> torch.device:
    """The torch device for `--device` (auto: CUDA when available); under torchrun this rank's own GPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RefineError("--device cuda was asked for, but no CUDA device is available")
    if device not in ("cpu", "cuda"):
        raise RefineError(f"unknown device {device!r}; choose auto, cuda or cpu")
    if device == "cuda" and distributed.launched():  # under torchrun: one GPU per rank
        if distributed.local_rank() >= torch.cuda.device_count():
            raise RefineError(
                f"rank {distributed.rank()} (local rank {distributed.local_rank()}) has no GPU of its own: this "
                f"machine has {torch.cuda.device_count()}; start at most that many processes per machine"
            )
        return torch.device("cuda", distributed.local_rank())
    return torch.device(device)


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `--amp` on `device` (None: full fp32).

    auto: bf16 on a CUDA device that supports it, else fp16 (with a GradScaler) on CUDA, fp32 on CPU.
    bf16 also runs on CPU (autocast supports it); fp16 on CPU is refused: without a GradScaler and with
    slow CPU kernels it has no upside.
    """
    if amp == "off":
        return None
    cuda = device.type == "cuda"
    if amp == "auto":
        if not cuda:
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp == "bf16":
        if cuda and not torch.cuda.is_bf16_supported():
            raise RefineError("--amp bf16: this CUDA device does not support bfloat16; use --amp fp16 or auto")
        return torch.bfloat16
    if amp == "fp16":
        if not cuda:
            raise RefineError("--amp fp16 needs a CUDA device; on CPU use --amp bf16 or off")
        return torch.float16
    raise RefineError(f"unknown --amp {amp!r}; choose auto, bf16, fp16 or off")


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bfloat16 in hardware: a CUDA device with bf16, a CPU with AVX512-BF16 or AMX.
    Elsewhere bf16 is emulated and slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    # torch's own checks (private: no public API asks the CPU yet); oneDNN uses these instructions when present.
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def resolve_encoder_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of the HQ-SAM encoder for extract's `--amp` on `device` (None: full fp32).

    auto: bf16 where the device computes it natively (`native_bf16`), else fp32. The stored features are the
    same within bf16 rounding either way (each segment records which), so precision is not in the fingerprint.
    fp16 is refused: it is known to produce garbage with ViT-H.
    """
    if amp == "off":
        return None
    if amp == "auto":
        return torch.bfloat16 if native_bf16(device) else None
    if amp == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise RefineError("--amp bf16: this CUDA device does not support bfloat16; use --amp off or auto")
        return torch.bfloat16
    raise RefineError(f"unknown --amp {amp!r} for the encoder; choose auto, bf16 or off")


def autocast(device: torch.device, dtype: torch.dtype | None) -> torch.amp.autocast:
    return torch.amp.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)
