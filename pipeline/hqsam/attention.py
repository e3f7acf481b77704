"""Fused attention for HQ-SAM's encoders: the same maths through `scaled_dot_product_attention`.

The package's attention builds the full attention matrix (for a global block of ViT-H: 4096 x 4096 x 16
heads per image) to add a bias before the softmax. Here the bias rides inside the dot product instead, so
SDPA's fused kernels (flash / memory-efficient on CUDA, flash on CPU) apply and the matrix is never built.

- SAM ViT (vit_b / l / h): the decomposed relative-position bias
      attn[i, j] = scale * q_i . k_j + rel_h[i, row(j)] + rel_w[i, col(j)]
  equals one dot product of q'_i = [scale * q_i, rel_h[i, :], rel_w[i, :]] with
  k'_j = [k_j, onehot(row(j)), onehot(col(j))]. Head dim grows by H + W (64 + 64 in a global block,
  14 + 14 in a window): 80 -> 208 for vit_h, 64 -> 192 for vit_b / l, within the 256 of flash kernels;
  v is zero-padded to the same width, which flash kernels require.
- TinyViT (vit_tiny): the bias is one small heads x N x N table per window (N <= 196); it is passed as
  SDPA's additive mask.

`use_fused_attention` swaps the forward of every such module of a built model; weights and state dict are
untouched, and the outputs equal the package's within float rounding.
"""

from __future__ import annotations

import types
import warnings

import torch
import torch.nn.functional as F
from torch import nn

# Fused kernels want the q / k head dim to be a multiple of 8 (16-byte alignment at 16-bit).
_ALIGN = 8


def fold_rel_pos(
    q: torch.Tensor, k: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold SAM's decomposed relative-position bias into q and k; score with SDPA at scale 1.

    q, k: B x heads x N x d, N = H * W tokens in row-major order (q not yet scaled);
    rel_pos_h: (2H - 1) x d, rel_pos_w: (2W - 1) x d.
    Returns q', k': B x heads x N x d' with d' = d + H + W rounded up to a multiple of 8, such that
    q' . k'^T = q . k^T * d^-0.5 + rel_h[i, row(j)] + rel_w[i, col(j)].
    """
    from segment_anything_hq.modeling.image_encoder import get_rel_pos  # the package's own lookup

    batch, heads, tokens, dim = q.shape
    height, width = size
    rel_h_table = get_rel_pos(height, height, rel_pos_h).to(q.dtype)  # H x H x d (query row, key row)
    rel_w_table = get_rel_pos(width, width, rel_pos_w).to(q.dtype)  # W x W x d
    grid_q = q.reshape(batch, heads, height, width, dim)
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", grid_q, rel_h_table).reshape(batch, heads, tokens, height)
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", grid_q, rel_w_table).reshape(batch, heads, tokens, width)
    # Key j sits in row j // W and column j % W.
    rows = torch.eye(height, dtype=q.dtype, device=q.device).repeat_interleave(width, dim=0)  # N x H
    cols = torch.eye(width, dtype=q.dtype, device=q.device).repeat(height, 1)  # N x W
    pad = -(dim + height + width) % _ALIGN
    q_zeros = q.new_zeros(batch, heads, tokens, pad)
    k_zeros = k.new_zeros(batch, heads, tokens, pad)
    folded_q = torch.cat([q * dim**-0.5, rel_h, rel_w, q_zeros], dim=-1)
    folded_k = torch.cat([k, rows.expand(batch, heads, -1, -1), cols.expand(batch, heads, -1, -1), k_zeros], dim=-1)
    return folded_q, folded_k


def sam_vit_attention(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`segment_anything_hq.modeling.image_encoder.Attention.forward` through SDPA.

    x: B x H x W x dim (B counts windows in windowed blocks); returns B x H x W x dim.
    """
    batch, height, width, _ = x.shape
    # B x N x 3 x heads x d -> 3 x B x heads x N x d
    qkv = self.qkv(x).reshape(batch, height * width, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    head_dim = v.shape[-1]
    if self.use_rel_pos:
        q, k = fold_rel_pos(q, k, self.rel_pos_h, self.rel_pos_w, (height, width))
        # Flash kernels (CUDA and CPU) want v as wide as q and k; without it SDPA falls back to kernels that
        # are slower (CPU: the unfused maths, attention matrix and all).
        v = F.pad(v, (0, q.shape[-1] - head_dim))
    else:
        q = q * self.scale
    out = F.scaled_dot_product_attention(q, k, v, scale=1.0)[..., :head_dim]  # B x heads x N x d
    out = out.transpose(1, 2).reshape(batch, height, width, -1)
    return self.proj(out)


def tiny_vit_attention(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`segment_anything_hq.modeling.tiny_vit_sam.Attention.forward` through SDPA.

    x: B x N x dim (B counts windows); returns B x N x dim.
    """
    batch, tokens, _ = x.shape
    qkv = self.qkv(self.norm(x)).view(batch, tokens, self.num_heads, -1)
    q, k, v = (t.transpose(1, 2) for t in qkv.split([self.key_dim, self.key_dim, self.d], dim=3))
    # Looked up from the parameters, not the eval-mode `ab` cache, which goes stale if weights change after eval().
    bias = self.attention_biases[:, self.attention_bias_idxs]  # heads x N x N
    # 1 x heads x N x N: SDPA's CPU flash kernel takes only a 4-D mask (a 3-D one falls back to the unfused maths).
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype)[None], scale=self.scale)
    return self.proj(out.transpose(1, 2).reshape(batch, tokens, self.dh))


def use_fused_attention(model: nn.Module) -> int:
    """Route every HQ-SAM attention module of `model` through SDPA; returns how many were swapped."""
    with warnings.catch_warnings():
        # segment-anything-hq imports timm through paths timm has deprecated; not ours to fix.
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", UserWarning)
        from segment_anything_hq.modeling import image_encoder, tiny_vit_sam

    fused = {image_encoder.Attention: sam_vit_attention, tiny_vit_sam.Attention: tiny_vit_attention}
    swapped = 0
    for module in model.modules():
        forward = fused.get(type(module))
        if forward is not None:
            module.forward = types.MethodType(forward, module)  # this instance only; the class stays as it is
            swapped += 1
    return swapped
