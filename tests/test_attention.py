"""Fused (SDPA) attention equals the package's own attention, for every encoder type, in fp32 on CPU.

The package initialises relative-position tables and TinyViT biases to zero, which would hide any error in
folding them; every test here fills them with random values first.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from pipeline.hqsam.attention import tiny_vit_attention, use_fused_attention
from pipeline.hqsam.encoder import build_encoder, identity_for

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # timm deprecation noise from the package's imports
    from segment_anything_hq.modeling import image_encoder, tiny_vit_sam

# (embed dim, heads) of the SAM ViT variants, as segment_anything_hq.build_sam builds them.
VIT_DIMS = {"vit_b": (768, 12), "vit_l": (1024, 16), "vit_h": (1280, 16)}
TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}


def randomise_biases(module: nn.Module) -> None:
    """Fill every relative-position table and TinyViT bias with random values (the package zero-inits them)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if "rel_pos" in name or "attention_biases" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    module.eval()  # TinyViT caches its biases (`ab`) when switched to eval


def fused_copy(module: nn.Module) -> nn.Module:
    fused = copy.deepcopy(module)
    assert use_fused_attention(fused) >= 1
    return fused


@pytest.mark.parametrize("model_type", sorted(VIT_DIMS))
@pytest.mark.parametrize(
    ("batch", "size"),
    [(2, (16, 24)), (3, (14, 14))],  # a global block (smaller, non-square grid) and a batch of 14 x 14 windows
    ids=["global", "windows"],
)
def test_sam_vit_attention_equals_the_package(model_type: str, batch: int, size: tuple[int, int]) -> None:
    dim, heads = VIT_DIMS[model_type]
    torch.manual_seed(0)
    reference = image_encoder.Attention(dim, heads, use_rel_pos=True, input_size=size)
    randomise_biases(reference)
    fused = fused_copy(reference)
    x = torch.randn(batch, *size, dim)
    with torch.inference_mode():
        expected, actual = reference(x), fused(x)
    torch.testing.assert_close(actual, expected, **TOLERANCE)


def test_sam_vit_attention_without_rel_pos_equals_the_package() -> None:
    torch.manual_seed(0)
    reference = image_encoder.Attention(768, 12, use_rel_pos=False).eval()
    x = torch.randn(2, 8, 8, 768)
    with torch.inference_mode():
        torch.testing.assert_close(fused_copy(reference)(x), reference(x), **TOLERANCE)


def test_the_comparison_would_catch_a_wrong_bias() -> None:
    """The folded bias moves the output far beyond the tolerance: a wrong sign or a swapped axis fails."""
    torch.manual_seed(0)
    reference = image_encoder.Attention(1280, 16, use_rel_pos=True, input_size=(16, 24))
    randomise_biases(reference)
    fused = fused_copy(reference)
    x = torch.randn(1, 16, 24, 1280)
    with torch.no_grad():
        wrong_sign = copy.deepcopy(reference)
        wrong_sign.rel_pos_w.neg_()
        swapped = copy.deepcopy(reference)
        swapped.rel_pos_h.copy_(swapped.rel_pos_h.flip(0))
    with torch.inference_mode():
        actual = fused(x)
        for wrong in (wrong_sign, swapped):
            assert not torch.allclose(actual, wrong(x), **TOLERANCE)


@pytest.mark.parametrize("resolution", [(7, 7), (14, 14)])
def test_tiny_vit_attention_equals_the_package(resolution: tuple[int, int]) -> None:
    torch.manual_seed(0)
    reference = tiny_vit_sam.Attention(160, 32, 5, attn_ratio=1, resolution=resolution)
    randomise_biases(reference)
    x = torch.randn(3, resolution[0] * resolution[1], 160)
    with torch.inference_mode():
        torch.testing.assert_close(fused_copy(reference)(x), reference(x), **TOLERANCE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiny_vit_attention_runs_the_cpu_flash_kernel(dtype: torch.dtype) -> None:
    """The point of the swap: no attention matrix on CPU either (a 3-D mask would fall back to the unfused maths)."""
    torch.manual_seed(0)
    reference = tiny_vit_sam.Attention(160, 32, 5, attn_ratio=1, resolution=(7, 7))
    reference.eval()  # its train() override returns None
    fused = fused_copy(reference)
    x = torch.randn(3, 49, 160)
    with torch.inference_mode(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiled:
            fused(x)
    kernels = {event.key for event in profiled.key_averages() if "attention" in event.key}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in kernels
    assert "aten::_scaled_dot_product_attention_math" not in kernels


def test_vit_tiny_encoder_with_fused_attention_equals_the_package() -> None:
    """The whole vit_tiny encoder, built both ways by `build_encoder`, on one image."""
    identity = identity_for("vit_tiny", None)
    reference = build_encoder(identity, None, fused_attention=False)
    randomise_biases(reference)
    fused = build_encoder(identity, None)
    fused.load_state_dict(reference.state_dict())
    fused.eval()
    swapped = sum(getattr(m.forward, "__func__", None) is tiny_vit_attention for m in fused.modules())
    assert swapped == sum(isinstance(m, tiny_vit_sam.Attention) for m in reference.modules()) == 10
    x = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        (expected, expected_interm), (actual, actual_interm) = reference(x), fused(x)
    torch.testing.assert_close(actual, expected, **TOLERANCE)
    torch.testing.assert_close(actual_interm[0], expected_interm[0], **TOLERANCE)
