"""Zero-shot snap: a box prompt -> HQ-SAM's mask -> the mask's tight box, from stored features alone.

The store holds everything HQ-SAM's mask decoder reads: the image embedding (256 x 64 x 64) and the early
feature `interm_embeddings[0]` (C x 64 x 64). `BoxSnapper` is the prompt encoder and HQ mask decoder of
the weights that made a store namespace, without the image encoder; `snap_boxes` prompts it with an
image's boxes exactly as `segment_anything_hq.SamPredictor.predict_torch` does, upscales the masks as
`Sam.postprocess_masks` does and returns each mask's tight box. Nothing here runs the image encoder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.ops import masks_to_boxes

from pipeline.apply import Proposal, Proposer
from pipeline.boxes import to_input, valid_boxes
from pipeline.encoder import (
    DEFAULT_SEED,
    ENCODERS,
    EncoderIdentity,
    build_seeded_sam,
    check_model_type,
    fit_problems,
    identity_for,
    read_state_dict,
    sha256_file,
)
from pipeline.errors import RefineError
from pipeline.shapes import IMAGE_SIZE
from pipeline.store import Entry, FeatureStore, Namespace

if TYPE_CHECKING:
    from segment_anything_hq.modeling import MaskDecoderHQ, PromptEncoder

MASK_THRESHOLD = 0.0  # `Sam.mask_threshold`: a pixel is in the mask where its logit is above it
# Boxes per decoder call. The decoder holds ~80 MB of activations per box (float32); on CPU its time per
# box stops falling at about this batch, so a larger one would only cost memory.
DECODER_BATCH = 16
# Upscaled float32 logits (1024 x 1024 and the original size) held at once: about 256 MB, whatever the image.
MASK_BYTES = 256 << 20
DECODER_PARTS = ("prompt_encoder.", "mask_decoder.")


class BoxSnapper(nn.Module):
    """HQ-SAM's prompt encoder and HQ mask decoder, without the image encoder: box prompts on stored features."""

    def __init__(self, prompt_encoder: PromptEncoder, mask_decoder: MaskDecoderHQ, fingerprint: str) -> None:
        """
        Arguments:
          prompt_encoder (PromptEncoder): encodes the box prompts.
          mask_decoder (MaskDecoderHQ): predicts masks from the features and the encoded prompts.
          fingerprint (str): the store namespace whose features these weights belong to.
        """
        super().__init__()
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.fingerprint = fingerprint

    def forward(
        self, embedding: Tensor, early: Tensor, boxes: Tensor, multimask_output: bool, hq_token_only: bool
    ) -> tuple[Tensor, Tensor]:
        """Predict one mask per box, as `SamPredictor.predict_torch` does for box prompts.

        Arguments:
          embedding (Tensor): the image embedding, 1 x 256 x 64 x 64 float32.
          early (Tensor): the early feature `interm_embeddings[0]`, 1 x C x 64 x 64 float32.
          boxes (Tensor): N x 4 xyxy box prompts in encoder-input pixels (the 1024 frame).
          multimask_output (bool): predict three masks per box; the HQ decoder itself keeps the one with
            the highest predicted IoU, so there is one mask per box either way.
          hq_token_only (bool): the HQ token's mask alone, instead of its sum with SAM's mask.

        Returns:
          (Tensor): low-resolution mask logits, N x 1 x 256 x 256.
          (Tensor): the predicted IoU of each mask, N x 1.
        """
        sparse, dense = self.prompt_encoder(points=None, boxes=boxes, masks=None)
        return self.mask_decoder(
            image_embeddings=embedding,
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
            hq_token_only=hq_token_only,
            # The decoder reads only [0], channels last, as the image encoder returns it.
            interm_embeddings=[early.permute(0, 2, 3, 1)],
        )


def recorded_seed(namespace: Namespace) -> int:
    """The seed of a random-init namespace's weights, as its provenance records them (else the default)."""
    weights = str(namespace.provenance.get("weights", ""))
    prefix = "random-init:seed="
    return int(weights[len(prefix) :]) if weights.startswith(prefix) else DEFAULT_SEED


def snap_namespace(store: FeatureStore, checkpoint: Path | None, model_type: str | None = None) -> Namespace:
    """The namespace of `store` whose features `checkpoint`'s encoder made (None: a seeded random init, with
    the seed the namespace records); one-line error when none or several match."""
    if checkpoint is not None and not checkpoint.is_file():
        raise RefineError(f"{checkpoint}: checkpoint file not found")
    weights = f"sha256:{sha256_file(checkpoint)}" if checkpoint is not None else None
    matches = []
    for fingerprint in store.fingerprints():
        namespace = Namespace.open(store, fingerprint)
        variant = model_type or namespace.provenance.get("model_type")
        if variant not in ENCODERS:
            continue
        name = checkpoint.name if checkpoint is not None else None
        identity = EncoderIdentity(variant, weights or f"random-init:seed={recorded_seed(namespace)}", name)
        if identity.fingerprint == fingerprint:
            matches.append(namespace)
    source = checkpoint if checkpoint is not None else "random init"
    if not matches:
        held = ", ".join(
            f"{f} ({Namespace.open(store, f).provenance.get('weights_description', '?')})" for f in store.fingerprints()
        )
        raise RefineError(
            f"{source}: {store.url} holds no features of these weights (it has: {held or 'none'}); snap with the "
            "checkpoint that extracted them, or extract with this one first"
        )
    if len(matches) > 1:
        raise RefineError(
            f"{source}: several namespaces of {store.url} fit ({', '.join(n.fingerprint for n in matches)}); "
            "name the encoder with --encoder"
        )
    return matches[0]


def build_snapper(
    namespace: Namespace, checkpoint: Path | None = None, *, model_type: str | None = None, seed: int | None = None
) -> BoxSnapper:
    """The prompt encoder and HQ mask decoder of the encoder that made `namespace`, in eval mode, on the CPU.

    Arguments:
      namespace (Namespace): the store namespace whose features will be snapped.
      checkpoint (Path or None): the HQ-SAM checkpoint (`sam_hq_vit_*.pth`) that extracted them; None: the
        seeded random init of `pipeline.encoder` (the whole model is built with the seed, so its decoder is
        the one that goes with the random image encoder).
      model_type (str or None): the HQ-SAM variant; None: the one the namespace records.
      seed (int or None): the seed of the random init, when there is no checkpoint; None: the namespace's.

    Weights whose encoder fingerprint is not the namespace's (another variant, seed or checkpoint) are a
    one-line RefineError naming both fingerprints; an unreadable checkpoint is one naming the file.
    """
    provenance = namespace.provenance
    model_type = model_type or provenance.get("model_type")
    if not model_type:
        raise RefineError(
            f"{namespace.store.url}: namespace {namespace.fingerprint} records no model type; name the encoder"
        )
    check_model_type(model_type)
    seed = recorded_seed(namespace) if seed is None else seed
    identity = identity_for(model_type, checkpoint, seed)
    state = None
    if checkpoint is not None:
        # Keep only the decoder's tensors: the image encoder's (most of the file) are freed at once.
        state = {k: v for k, v in read_state_dict(checkpoint).items() if k.startswith(DECODER_PARTS)}
    if identity.fingerprint != namespace.fingerprint:
        source = checkpoint if checkpoint is not None else f"random init (seed {seed})"
        made_by = provenance.get("weights_description", "unrecorded weights")
        raise RefineError(
            f"{source}: is encoder {identity.fingerprint} ({model_type}, {identity.describe_weights()}), but "
            f"namespace {namespace.fingerprint} of {namespace.store.url} was extracted by "
            f"{provenance.get('model_type', 'an unrecorded variant')} ({made_by}); snap with its checkpoint or seed"
        )
    # The image encoder is built only so that the seeded draws reach the decoder as in extraction; it is
    # dropped with `sam` on return and never run.
    sam = build_seeded_sam(model_type, seed)
    snapper = BoxSnapper(sam.prompt_encoder, sam.mask_decoder, identity.fingerprint)
    if state is not None:
        problems = fit_problems(state, snapper)
        if problems:
            raise RefineError(
                f"{checkpoint}: its prompt encoder and mask decoder do not fit HQ-SAM {model_type}: "
                f"{', '.join(problems)}; snap needs a whole HQ-SAM checkpoint (sam_hq_vit_*.pth)"
            )
        snapper.load_state_dict(state)
    return snapper.eval().requires_grad_(False)


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
    height, width = entry.original_size
    count = len(boxes)
    if count == 0:
        no_masks = torch.zeros((0, height, width), dtype=torch.bool) if return_masks else None
        return SnapResult(torch.zeros((0, 4)), torch.zeros(0), torch.zeros(0, dtype=torch.bool), no_masks)
    embedding, early = namespace.read(entry, check=True)  # never snap from damaged features
    embedding_t = torch.tensor(embedding[None], dtype=torch.float32, device=device)  # the stored arrays are read-only
    early_t = torch.tensor(early[None], dtype=torch.float32, device=device)
    # `to_input` is `ResizeLongestSide.apply_boxes_torch` on the stored sizes, to the bit.
    prompts = to_input(boxes.float(), entry.original_size, entry.resized_size).to(device)
    per_chunk = max(1, MASK_BYTES // (4 * (IMAGE_SIZE * IMAGE_SIZE + height * width)))
    tight: list[Tensor] = []
    empty: list[Tensor] = []
    scores: list[Tensor] = []
    masks_kept: list[Tensor] = []
    for start in range(0, count, DECODER_BATCH):
        low_res, iou = snapper(
            embedding_t, early_t, prompts[start : start + DECODER_BATCH], multimask_output, hq_token_only
        )
        scores.append(iou[:, 0])
        for part in low_res.split(per_chunk):
            masks = postprocess_masks(part, entry.resized_size, entry.original_size)[:, 0] > mask_threshold
            tight.append(tight_boxes(masks))
            empty.append(~masks.flatten(1).any(dim=1))
            if return_masks:
                masks_kept.append(masks.cpu())
    kept_coarse = torch.cat(empty).cpu()
    coarse = boxes.float().cpu()
    snapped = valid_boxes(
        torch.where(kept_coarse[:, None], coarse, torch.cat(tight).cpu()), coarse, entry.original_size
    )
    return SnapResult(
        snapped,
        torch.cat(scores).float().clamp(0.0, 1.0).cpu(),
        kept_coarse,
        torch.cat(masks_kept) if return_masks else None,
    )


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


def snap_proposer(
    snapper: BoxSnapper, namespace: Namespace, device: torch.device, options: SnapOptions, masks: bool = False
) -> Proposer:
    """Snap as a box method for `pipeline.apply`: the decoder's predicted IoU as the score, an empty mask as
    no proposal, and (with `masks`) each mask as COCO RLE."""
    snapper = snapper.to(device)

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
