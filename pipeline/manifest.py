"""The dataset manifest: which image (id, file name) of a dataset has which store key and sizes.

`extract` writes one per dataset into the store (`<fingerprint>/datasets/<name>.json`, through
`Namespace.write_dataset`) and optionally a copy for DVC (`--manifest`); `train`, `evaluate`, `apply` and
`store verify` read it through `Namespace.dataset`. It is content-determined (no times), sorted by image
id, so DVC sees a change only when the dataset or its features change. Its fields:

  format "refine-dataset-manifest", version 1, dataset (name), fingerprint (the namespace's encoder),
  encoder (model type), weights, early_channels,
  images: [{id, file_name, key, original_size [h, w], resized_size [h, w]}],
  skipped: file names left out (unreadable images, `extract --skip-bad-images`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MANIFEST_FORMAT = "refine-dataset-manifest"
MANIFEST_VERSION = 1

Sizes = tuple[tuple[int, int], tuple[int, int]]  # (original, resized) as (height, width)


@dataclass(frozen=True)
class ManifestImage:
    """One image of a dataset: its id and file name in the annotations, its store key and its sizes."""

    id: int
    file_name: str
    key: str
    sizes: Sizes


def dataset_manifest(
    name: str,
    *,
    fingerprint: str,
    encoder: str,
    weights: str,
    early_channels: int,
    images: list[ManifestImage],
    skipped: list[str],
) -> dict[str, Any]:
    """The manifest record of dataset `name` (fields in the module docstring); images sorted by id."""
    return {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "dataset": name,
        "fingerprint": fingerprint,
        "encoder": encoder,
        "weights": weights,
        "early_channels": early_channels,
        "images": [
            {
                "id": image.id,
                "file_name": image.file_name,
                "key": image.key,
                "original_size": list(image.sizes[0]),
                "resized_size": list(image.sizes[1]),
            }
            for image in sorted(images, key=lambda image: image.id)
        ],
        "skipped": sorted(skipped),
    }
