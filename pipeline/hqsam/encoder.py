"""The HQ-SAM image encoder: variants, safe checkpoint loading, seeded random init, and its fingerprint.

The encoder maps a batch of padded images (B x 3 x 1024 x 1024) to
  - the image embedding   (B x 256 x 64 x 64), and
  - the early feature `interm_embeddings[0]` (B x C x 64 x 64, C from `ENCODERS`),
the two features the refiner is trained on.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from pipeline.errors import RefineError
from pipeline.shapes import IMAGE_SIZE
from pipeline.torch_files import read_torch_file

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
DEFAULT_SEED = 0
# Bumped whenever what an entry means changes (preprocessing, layout); part of every fingerprint.
FEATURE_FORMAT = 1


@dataclass(frozen=True)
class EncoderSpec:
    """One HQ-SAM variant (a key of `segment_anything_hq.sam_model_registry`) and its early feature's channels."""

    early_channels: int
    embed_dim: int  # width of the ViT trunk; used to recognise a checkpoint's variant


ENCODERS: dict[str, EncoderSpec] = {
    "vit_tiny": EncoderSpec(early_channels=160, embed_dim=64),
    "vit_b": EncoderSpec(early_channels=768, embed_dim=768),
    "vit_l": EncoderSpec(early_channels=1024, embed_dim=1024),
    "vit_h": EncoderSpec(early_channels=1280, embed_dim=1280),
}


@dataclass(frozen=True)
class EncoderIdentity:
    """Everything that determines the stored features; its hash is the store namespace."""

    model_type: str
    weights: str  # "sha256:<hex>" of the checkpoint, or "random-init:seed=<N>"
    checkpoint_name: str | None = None  # file name only: a user's paths never go into the store

    @property
    def random_init(self) -> bool:
        return self.weights.startswith("random-init")

    @property
    def early_channels(self) -> int:
        return ENCODERS[self.model_type].early_channels

    def fingerprint_fields(self) -> dict:
        return {
            "feature_format": FEATURE_FORMAT,
            "model_type": self.model_type,
            "weights": self.weights,
            "preprocessing": {
                "resize": "longest side to 1024, bilinear (PIL), EXIF orientation applied, RGB",
                "pad": "bottom-right to 1024 x 1024, zeros after normalisation",
                "pixel_mean": list(PIXEL_MEAN),
                "pixel_std": list(PIXEL_STD),
            },
            "features": {"embedding": "256x64x64", "early": "interm_embeddings[0] as Cx64x64"},
            "dtype": "float16",
        }

    @property
    def fingerprint(self) -> str:
        canonical = json.dumps(self.fingerprint_fields(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def describe_weights(self) -> str:
        if self.random_init:
            seed = self.weights.split("=", 1)[1]
            return f"RANDOM INIT (seed {seed}) - not pretrained features"
        return f"checkpoint {self.checkpoint_name} ({self.weights[:19]}...)"

    def provenance(self) -> dict:
        """Human-readable record stored with the namespace."""
        versions = {}
        for package in ("torch", "segment-anything-hq", "zarr", "numcodecs", "refine"):
            try:
                versions[package] = metadata.version(package)
            except metadata.PackageNotFoundError:
                versions[package] = "unknown"
        return {
            **self.fingerprint_fields(),
            "fingerprint": self.fingerprint,
            "weights_description": self.describe_weights(),
            "random_init": self.random_init,
            "checkpoint_name": self.checkpoint_name,
            "early_channels": self.early_channels,
            "versions": versions,
        }


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def identity_for(model_type: str, checkpoint: Path | None, seed: int = DEFAULT_SEED) -> EncoderIdentity:
    """The identity of an encoder without building it (cheap: a warm re-run needs only this)."""
    check_model_type(model_type)
    if checkpoint is None:
        return EncoderIdentity(model_type, f"random-init:seed={seed}")
    if not checkpoint.is_file():
        raise RefineError(f"{checkpoint}: checkpoint file not found")
    return EncoderIdentity(model_type, f"sha256:{sha256_file(checkpoint)}", checkpoint.name)


def check_model_type(model_type: str) -> None:
    if model_type not in ENCODERS:
        raise RefineError(f"unknown encoder {model_type!r}; choose one of {', '.join(ENCODERS)}")


def build_seeded_sam(model_type: str, seed: int = DEFAULT_SEED) -> nn.Module:
    """The whole HQ-SAM model (`Sam`: image encoder, prompt encoder, mask decoder) with seeded random weights.

    The seed covers the whole build, so the prompt encoder and mask decoder that go with a random-init
    image encoder come out the same in every process (`pipeline.inference.snap` builds them this way).
    """
    # Seed only our own RNG stream so building a model never perturbs the caller's randomness.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with warnings.catch_warnings():
            # segment-anything-hq imports timm through paths timm has deprecated; not ours to fix.
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", UserWarning)
            from segment_anything_hq import sam_model_registry  # heavy: imported only to build a model

        builder: Callable[[], nn.Module] = sam_model_registry[model_type]
        return builder()


def build_encoder(
    identity: EncoderIdentity, checkpoint: Path | None, seed: int = DEFAULT_SEED, *, fused_attention: bool = True
) -> nn.Module:
    """The real HQ-SAM image encoder, in eval mode, with checkpoint weights or seeded random ones.

    With `fused_attention` its attention runs through SDPA (`pipeline.hqsam.attention`): the same features within
    float rounding, so it is not part of the fingerprint, without ever building the attention matrix.
    """
    encoder = build_seeded_sam(identity.model_type, seed).image_encoder
    if checkpoint is not None:
        encoder.load_state_dict(load_encoder_state(checkpoint, identity.model_type, encoder))
    if fused_attention:
        from pipeline.hqsam.attention import use_fused_attention  # imports the package: only when building

        use_fused_attention(encoder)
    return encoder.eval().requires_grad_(False)


def load_encoder_state(checkpoint: Path, model_type: str, encoder: nn.Module) -> dict[str, torch.Tensor]:
    """Read a SAM / HQ-SAM checkpoint safely and return the image encoder's part, checked against the model."""
    state = read_state_dict(checkpoint)
    prefix = "image_encoder."
    if any(key.startswith(prefix) for key in state):
        state = {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
    problems = fit_problems(state, encoder)
    if problems:
        guess = guess_model_type(state)
        hint = f"; it looks like a {guess} checkpoint" if guess and guess != model_type else ""
        raise RefineError(f"{checkpoint}: does not fit encoder {model_type}: {', '.join(problems)}{hint}")
    return state


def read_state_dict(checkpoint: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors, read safely (`weights_only`) and unwrapped from a {"model": ...} or
    {"state_dict": ...} wrapper; anything else is a one-line RefineError naming the file."""
    raw = read_torch_file(checkpoint, "PyTorch state dict")
    state = _unwrap_state_dict(raw)
    if state is None:
        raise RefineError(f"{checkpoint}: expected a state dict of tensors, found {type(raw).__name__}")
    return state


def fit_problems(state: dict[str, torch.Tensor], module: nn.Module) -> list[str]:
    """What keeps `state` from loading into `module` strictly: missing, unexpected and mis-shaped keys."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(k for k in set(expected) & set(state) if state[k].shape != expected[k].shape)
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches (e.g. {mismatched[0]})")
    return problems


def _unwrap_state_dict(raw: object) -> dict[str, torch.Tensor] | None:
    for wrapper in ("model", "state_dict"):
        if isinstance(raw, dict) and isinstance(raw.get(wrapper), dict):
            raw = raw[wrapper]
    if (
        isinstance(raw, dict)
        and raw
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in raw.items())
    ):
        return raw
    return None


def guess_model_type(state: dict[str, torch.Tensor]) -> str | None:
    """Which variant a (prefix-stripped) encoder state dict belongs to, from its patch embedding width."""
    if any(key.startswith("patch_embed.seq") for key in state):
        return "vit_tiny"
    weight = state.get("patch_embed.proj.weight")
    if weight is None:
        return None
    return next((name for name, spec in ENCODERS.items() if spec.embed_dim == weight.shape[0]), None)


class FeatureEncoder(nn.Module):
    """Normalise, pad-mask and encode uint8 images; returns (B x 256 x 64 x 64, B x C x 64 x 64)."""

    def __init__(self, image_encoder: nn.Module) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(1, 3, 1, 1), persistent=False)
        coords = torch.arange(IMAGE_SIZE)
        self.register_buffer("coords", coords, persistent=False)

    def forward(self, pixels: torch.Tensor, resized_hw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pixels: B x 3 x 1024 x 1024 uint8 (image at top-left); resized_hw: B x 2 (height, width)."""
        x = (pixels.float() - self.pixel_mean) / self.pixel_std
        inside_rows = self.coords.view(1, -1) < resized_hw[:, :1]  # B x 1024
        inside_cols = self.coords.view(1, -1) < resized_hw[:, 1:]
        inside = inside_rows[:, None, :, None] & inside_cols[:, None, None, :]
        # SAM pads after normalisation, so the padding is 0 in normalised space, not black.
        x = x * inside
        embedding, interm = self.image_encoder(x)
        early = interm[0].permute(0, 3, 1, 2)  # B x 64 x 64 x C -> B x C x 64 x 64
        return embedding, early
