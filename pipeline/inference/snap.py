"""Zero-shot snap: a box prompt -> HQ-SAM's mask -> the mask's tight box, from stored features alone.

The store holds everything HQ-SAM's mask decoder reads: the image embedding (256 x 64 x 64) and the early
feature `interm_embeddings[0]` (C x 64 x 64). `snap_boxes` prompts a `BoxSnapper` (the prompt encoder and
HQ mask decoder of the weights that made a store namespace, `pipeline.inference.snapper`) with an image's
boxes exactly as `segment_anything_hq.SamPredictor.predict_torch` does, upscales the masks as
`Sam.postprocess_masks` does and returns each mask's tight box. Nothing here runs the image encoder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch import Tensor
from torch.nn import functional as F
from torchvision.ops import masks_to_boxes

from pipeline.boxes import to_input, valid_boxes
from pipeline.errors import RefineError
from pipeline.inference.core import Proposal, Proposer
from pipeline.inference.snapper import BoxSnapper, build_snapper
from pipeline.shapes import IMAGE_SIZE
from pipeline.store import Entry, Namespace

MASK_THRESHOLD = 0.0  # `Sam.mask_threshold`: a pixel is in the mask where its logit is above it
# Boxes per decoder call. The decoder holds ~80 MB of activations per box (float32); on CPU its time per
# box stops falling at about this batch, so a larger one would only cost memory.
DECODER_BATCH = 16
# Upscaled float32 logits (1024 x 1024 and the original size) held at once: about 256 MB, whatever the image.
MASK_BYTES = 256 << 20


def postprocess_masks(low_res: Tensor, input_size: tuple[int, int], original_size: tuple[int, int]) -> Tensor:
    """Mask logits B x C x 256 x 256 -> B x C x H x W at the original size, exactly as `Sam.postprocess_masks`:
    upscale to the 1024 x 1024 encoder input, cut the padding off (`input_size`: the resized image), resize."""
    masks = F.interpolate(low_res, (IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    masks = masks[..., : input_size[0], : input_size[1]]
    return F.interpolate(masks, original_size, mode="bilinear", align_corners=False)


@dataclass(frozen=True)
class SnapResult:
    """One image's snapped boxes: N boxes, the image H x W pixels."""

    boxes: Tensor  # N x 4 xyxy float32, original pixels: each mask's tight box, or the coarse box (kept_coarse)
    scores: Tensor  # N float32: the decoder's predicted IoU of the chosen mask, clamped to [0, 1]
    kept_coarse: Tensor  # N bool: the mask was empty, so the coarse box was kept
    masks: Tensor | None = None  # N x H x W bool, when asked for


@torch.inference_mode()
def snap_boxes(
    snapper: BoxSnapper,
    namespace: Namespace,
    entry: Entry,
    boxes: Tensor,
    device: torch.device,
    *,
    multimask_output: bool = False,
    hq_token_only: bool = False,
    mask_threshold: float = MASK_THRESHOLD,
    return_masks: bool = False,
) -> SnapResult:
    """Snap one image's boxes to HQ-SAM masks from one read of its stored features.

    Each box prompts the decoder as it prompts `SamPredictor.predict_torch` (mapped to the 1024 frame as by
    `ResizeLongestSide.apply_boxes_torch`, the stored float16 features as float32), all boxes of the image
    in one decoder call (in calls of `DECODER_BATCH` boxes beyond that). A mask's tight box follows COCO's
    convention for pixel masks: a mask covering columns x0..x1 and rows y0..y1 (inclusive) has the box
    [x0, y0, x1 + 1, y1 + 1] (COCO [x0, y0, x1 - x0 + 1, y1 - y0 + 1]; `torchvision.ops.masks_to_boxes`
    gives [x0, y0, x1, y1]; see `tight_boxes`). An empty mask keeps the coarse box, clipped to the image as
    every box is.

    Arguments:
      snapper (BoxSnapper): built for this namespace (`build_snapper`), already on `device`.
      namespace (Namespace): the store namespace holding the image's features.
      entry (Entry): the image's entry.
      boxes (Tensor): N x 4 xyxy coarse boxes in original pixels.
      device (torch.device): where the decoder runs.
      multimask_output (bool): three masks per box, the one with the highest predicted IoU kept.
      hq_token_only (bool): the HQ token's mask alone instead of its sum with SAM's.
      mask_threshold (float): logit above which a pixel is in the mask.
      return_masks (bool): also return the masks (N x H x W bool, on the CPU).

    Returns:
      (SnapResult): boxes (N x 4, original pixels, valid and inside the image), scores, kept_coarse, masks.
    """
    if snapper.fingerprint != namespace.fingerprint:
        raise RefineError(
            f"a snapper of encoder {snapper.fingerprint} cannot snap features of namespace {namespace.fingerprint}"
        )
    if len(boxes) == 0:
        no_masks = torch.zeros((0, *entry.original_size), dtype=torch.bool) if return_masks else None
        return SnapResult(torch.zeros((0, 4)), torch.zeros(0), torch.zeros(0, dtype=torch.bool), no_masks)
    # Never snap from damaged features; the stored arrays are read-only, so they are copied.
    features = tuple(
        torch.tensor(a[None], dtype=torch.float32, device=device) for a in namespace.read(entry, check=True)
    )
    # `to_input` is `ResizeLongestSide.apply_boxes_torch` on the stored sizes, to the bit.
    prompts = to_input(boxes.float(), entry.original_size, entry.resized_size).to(device)
    outputs = (multimask_output, hq_token_only)
    tight, empty, scores, masks = _decode(snapper, features, prompts, entry, outputs, mask_threshold, return_masks)
    kept_coarse = torch.cat(empty).cpu()
    coarse = boxes.float().cpu()
    snapped = valid_boxes(
        torch.where(kept_coarse[:, None], coarse, torch.cat(tight).cpu()), coarse, entry.original_size
    )
    scored = torch.cat(scores).float().clamp(0.0, 1.0).cpu()
    return SnapResult(snapped, scored, kept_coarse, torch.cat(masks) if return_masks else None)


def _decode(
    snapper: BoxSnapper,
    features: tuple[Tensor, ...],
    prompts: Tensor,
    entry: Entry,
    outputs: tuple[bool, bool],
    mask_threshold: float,
    return_masks: bool,
) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
    """The decoder on N box prompts (1024 frame) in calls of `DECODER_BATCH`, masks upscaled in chunks of at
    most `MASK_BYTES`: per chunk the masks' tight boxes, which are empty, the decoder's IoUs (per call) and,
    with `return_masks`, the masks (on the CPU). features: the 1 x 256 x 64 x 64 embedding and 1 x C x 64 x 64
    early feature; outputs: (multimask_output, hq_token_only)."""
    height, width = entry.original_size
    per_chunk = max(1, MASK_BYTES // (4 * (IMAGE_SIZE * IMAGE_SIZE + height * width)))
    tight: list[Tensor] = []
    empty: list[Tensor] = []
    scores: list[Tensor] = []
    masks_kept: list[Tensor] = []
    for start in range(0, len(prompts), DECODER_BATCH):
        low_res, iou = snapper(*features, prompts[start : start + DECODER_BATCH], *outputs)
        scores.append(iou[:, 0])
        for part in low_res.split(per_chunk):
            masks = postprocess_masks(part, entry.resized_size, entry.original_size)[:, 0] > mask_threshold
            tight.append(tight_boxes(masks))
            empty.append(~masks.flatten(1).any(dim=1))
            if return_masks:
                masks_kept.append(masks.cpu())
    return tight, empty, scores, masks_kept


def tight_boxes(masks: Tensor) -> Tensor:
    """N x H x W bool masks -> N x 4 xyxy float32 boxes that cover their pixels, as COCO boxes pixel masks:
    columns x0..x1 and rows y0..y1 (inclusive) give [x0, y0, x1 + 1, y1 + 1]. An empty mask gives [0, 0, 1, 1]."""
    # masks_to_boxes ends a box at its last pixel's index; COCO's box ends where that pixel ends.
    return masks_to_boxes(masks) + masks.new_tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float32)


def masks_to_rle(masks: Tensor) -> list[dict[str, Any]]:
    """N x H x W bool masks -> N COCO RLEs {"size": [H, W], "counts": str}, ready for JSON (`pycocotools`)."""
    if len(masks) == 0:
        return []
    # pycocotools encodes H x W x N uint8 in Fortran order; its counts are bytes.
    encoded = mask_utils.encode(np.asfortranarray(masks.cpu().numpy().transpose(1, 2, 0).astype(np.uint8)))
    return [{"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")} for rle in encoded]


@dataclass(frozen=True)
class SnapOptions:
    """How boxes are snapped (`snap_boxes`'s options)."""

    multimask_output: bool = False
    hq_token_only: bool = False
    mask_threshold: float = MASK_THRESHOLD


def snap_method(
    namespace: Namespace,
    checkpoint: Path | None,
    device: torch.device,
    options: SnapOptions = SnapOptions(),
    masks: bool = False,
    model_type: str | None = None,
) -> Proposer:
    """Snap as a box method of the inference core, with the prompt encoder and decoder of the weights that
    made `namespace` (`build_snapper`): the decoder's predicted IoU as the score, an empty mask as no proposal,
    and (with `masks`) each mask as COCO RLE. What `apply --method snap` and `evaluate --methods snap` run."""
    snapper = build_snapper(namespace, checkpoint, model_type=model_type).to(device)

    def propose(entry: Entry, coarse: Tensor) -> Proposal:
        result = snap_boxes(
            snapper,
            namespace,
            entry,
            coarse,
            device,
            multimask_output=options.multimask_output,
            hq_token_only=options.hq_token_only,
            mask_threshold=options.mask_threshold,
            return_masks=masks,
        )
        rles = masks_to_rle(result.masks) if result.masks is not None else None
        return Proposal(result.boxes, result.scores, result.kept_coarse, rles)

    return propose
