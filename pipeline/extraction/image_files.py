"""`extract`'s input side: the images of a dataset, and the DataLoader dataset that hashes and decodes them.

Each file is read once, in a worker: hashed (its content key), and decoded and resized for the encoder only
when its key is new and this rank's to encode. Workers run no torch kernels (OpenMP after fork can hang).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.coco import load_coco
from pipeline.errors import RefineError
from pipeline.images import IMAGE_SUFFIXES, content_key, prepare, read_file


@dataclass
class ImageItem:
    """One image of the dataset: its id and name in the annotations, its file, and (once hashed) its key."""

    id: int
    file_name: str
    path: Path
    size: tuple[int, int] | None = None  # (height, width) the annotations give, if any
    key: str = ""


def list_images(images: Path, annotations: Path | None, dataset: str | None) -> tuple[str, list[ImageItem]]:
    """The dataset's name (`dataset`, else the stem of `annotations`, else the folder's name) and images: with
    annotations exactly the images they list, each checked to exist; without, every image file under `images`."""
    if not images.is_dir():
        raise RefineError(f"{images}: image directory not found")
    if annotations is not None:
        coco = load_coco(annotations)
        items = [ImageItem(im.id, im.file_name, images / im.file_name, (im.height, im.width)) for im in coco.images]
        for item in items:
            if not item.path.is_file():
                raise RefineError(
                    f"{annotations}: image id={item.id}: file {item.file_name!r} not found under the image directory"
                )
        return dataset or annotations.stem, items
    files = sorted(p for p in images.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    items = [ImageItem(i, p.relative_to(images).as_posix(), p) for i, p in enumerate(files)]
    return dataset or images.name, items


@dataclass
class ImageSample:
    """What a DataLoader worker hands back for one file: a hit (key only), a decoded miss, or an error."""

    index: int
    key: str
    decoded: bool = False  # a miss, decoded for the encoder
    pixels: np.ndarray | None = None  # 3 x 1024 x 1024 uint8 until collated
    original: tuple[int, int] = (0, 0)
    resized: tuple[int, int] = (0, 0)
    error: str | None = None


class ImageDataset(Dataset):
    """Reads each file once in a DataLoader worker: hashes it, and decodes it only if its key is new and
    this rank's to encode (`mine`; under torchrun every rank hashes every file, each encodes its share).

    A file that cannot be decoded comes back as its error message, never raised, so one bad image
    does not stop the batch.
    """

    def __init__(self, items: list[ImageItem], committed: frozenset[str], mine: Callable[[str], bool]) -> None:
        self.items = items
        self.committed = committed
        self.mine = mine

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> ImageSample:
        item = self.items[index]
        try:
            data = read_file(item.path)
            key = content_key(data)
            if key in self.committed or not self.mine(key):
                return ImageSample(index, key)
            pixels, original, resized = prepare(item.path, data)
            return ImageSample(index, key, True, pixels, original, resized)
        except RefineError as error:
            return ImageSample(index, "", error=f"{error} [image id={item.id}]")


def collate_images(samples: list[ImageSample]) -> tuple[list[ImageSample], torch.Tensor]:
    """Stack the decoded images in numpy: workers must not run torch kernels (OpenMP after fork can hang)."""
    decoded = [s for s in samples if s.decoded]
    pixels = np.stack([s.pixels for s in decoded]) if decoded else np.zeros((0, 3, 1, 1), np.uint8)
    for sample in decoded:
        sample.pixels = None  # travels once, in the stacked tensor (shared memory)
    return samples, torch.from_numpy(pixels)
