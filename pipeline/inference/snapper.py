"""HQ-SAM's prompt encoder and HQ mask decoder without the image encoder (`BoxSnapper`), built from the weights
that made a store namespace: its recorded checkpoint or seeded random init, checked against the namespace's
encoder fingerprint."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from torch import Tensor, nn

from pipeline.errors import RefineError
from pipeline.hqsam.encoder import (
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
from pipeline.store import FeatureStore, Namespace

if TYPE_CHECKING:
    from segment_anything_hq.modeling import MaskDecoderHQ, PromptEncoder

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
        seeded random init of `pipeline.hqsam.encoder` (the whole model is built with the seed, so its decoder is
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
