"""What `extract` is asked to do and what it reports, as plain dataclasses that import nothing heavy: the CLI
shows their defaults in its help without loading torch."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ExtractConfig:
    images: Path
    store: str
    encoder: str = "vit_tiny"
    annotations: Path | None = None
    checkpoint: Path | None = None
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"  # the encoder's autocast: auto = bf16 where the device computes it natively
    batch_size: int | None = None
    workers: int | None = None
    dataset: str | None = None
    manifest_out: Path | None = None
    skip_bad_images: bool = False
    fused_attention: bool = True
    compile: bool = False
    check_hits: bool = True  # read back every committed entry the dataset uses; damaged ones are recomputed


@dataclass
class ExtractSummary:
    dataset: str
    fingerprint: str
    weights: str
    random_init: bool
    images: int = 0
    unique: int = 0
    hits: int = 0
    computed: int = 0
    failed: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)  # damaged entries and commit files found (recomputed)
    planes_added: int = 0  # entries of an older layout (no stride-4 plane) recomputed to add it
    wall_s: float = 0.0
    encoder_s: float = 0.0
    build_s: float = 0.0  # building the encoder (and loading its weights), once per run with a miss
    data_wait_s: float = 0.0
    bytes_written: int = 0


OnProgress = Callable[[str, int, int, ExtractSummary], None]  # (phase, done, total, counters so far)
