"""The dataset manifest: which image (id, file name) of a dataset has which store key and sizes.

`extract` writes one per dataset into the store (`<fingerprint>/datasets/<name>.json`, through
`Namespace.write_manifest`) and optionally a copy for DVC (`--manifest`); `train`, `evaluate`, `apply` and
`store verify` read its images through `manifest_images`. It is content-determined (no times), sorted by
image id, so DVC sees a change only when the dataset or its features change. Its fields:

  format "refine-dataset-manifest", version 2, dataset (name), fingerprint (the namespace's encoder),
  encoder (model type), weights, early_channels,
  images: {id: [...], file_name: [...], key: [...], height: [...], width: [...], resized_height: [...],
           resized_width: [...]}: one list per field, one position per image (sizes after EXIF orientation),
  skipped: file names left out (unreadable images, `extract --skip-bad-images`).

Version 1 (written before) held `images` as a list of {id, file_name, key, original_size [h, w],
resized_size [h, w]}; it reads as it is. Columns because a million images as a million objects cost
~1 GB to parse; as seven lists, a third of that.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.errors import RefineError

MANIFEST_FORMAT = "refine-dataset-manifest"
MANIFEST_VERSION = 2
SIZE_COLUMNS = ("height", "width", "resized_height", "resized_width")

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
    ordered = sorted(images, key=lambda image: image.id)
    return {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "dataset": name,
        "fingerprint": fingerprint,
        "encoder": encoder,
        "weights": weights,
        "early_channels": early_channels,
        "images": {
            "id": [image.id for image in ordered],
            "file_name": [image.file_name for image in ordered],
            "key": [image.key for image in ordered],
            **{
                column: [image.sizes[side][axis] for image in ordered]
                for column, (side, axis) in zip(SIZE_COLUMNS, ((0, 0), (0, 1), (1, 0), (1, 1)), strict=True)
            },
        },
        "skipped": sorted(skipped),
    }


@dataclass(frozen=True)
class ManifestImages:
    """A manifest's n images as columns, in manifest order."""

    ids: np.ndarray  # n int64
    file_names: list[str]
    keys: list[str]
    sizes: np.ndarray  # n x 4 int64: height, width, resized height, resized width
    skipped: frozenset[str] = frozenset()  # file names extract could not read (--skip-bad-images)

    def __len__(self) -> int:
        return len(self.keys)

    def original_size(self, position: int) -> tuple[int, int]:
        return int(self.sizes[position, 0]), int(self.sizes[position, 1])

    def resized_size(self, position: int) -> tuple[int, int]:
        return int(self.sizes[position, 2]), int(self.sizes[position, 3])


def manifest_images(manifest: Any, where: str) -> ManifestImages:
    """The images of a manifest of either version; anything malformed is a RefineError naming `where`."""
    try:
        version = manifest.get("version", 1)
        images = manifest["images"]
        if version == 1:
            columns = {
                "id": [image["id"] for image in images],
                "file_name": [image["file_name"] for image in images],
                "key": [image["key"] for image in images],
            }
            sizes = np.array([[*image["original_size"], *image["resized_size"]] for image in images], dtype=np.int64)
        elif version == MANIFEST_VERSION:
            columns = {name: images[name] for name in ("id", "file_name", "key")}
            sizes = np.stack([np.asarray(images[name], dtype=np.int64) for name in SIZE_COLUMNS], axis=1)
        else:
            raise RefineError(f"{where}: manifest version {version} is not supported (this refine reads 1 and 2)")
        result = ManifestImages(
            np.array(columns["id"], dtype=np.int64),
            [str(name) for name in columns["file_name"]],
            [str(key) for key in columns["key"]],
            sizes.reshape(-1, 4),
            frozenset(_strings(manifest.get("skipped", []), "skipped")),
        )
        if not len(result.ids) == len(result.file_names) == len(result) == len(result.sizes):
            raise ValueError("its columns differ in length")
        return result
    except RefineError:
        raise
    except (AttributeError, KeyError, TypeError, ValueError, OverflowError) as error:
        raise RefineError(
            f"{where}: the manifest is damaged ({type(error).__name__}: {str(error)[:160]}); "
            "repair: `refine extract` of this dataset writes it again"
        ) from None


def _strings(value: Any, field: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValueError(f"'{field}' is not a list of file names")
    return value
