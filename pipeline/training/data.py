"""Training data from the feature store: one item per image = its stored features and its boxes, read with
one store read (`FeatureDataset`), batched by `feature_loader`; and the feature statistics the refiner
normalises with.

Zarr v3 runs an event loop and thread pools, and a process that forks after a store was opened can
deadlock; so the dataset opens its store lazily in the process that reads (never pickles it), and
`feature_loader` starts workers with forkserver.
"""

from __future__ import annotations

import math
import multiprocessing
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from pipeline.errors import RefineError
from pipeline.shapes import FEATURE_STRIDE
from pipeline.splits import ImageBoxes
from pipeline.store import FeatureStore, Namespace
from pipeline.store.namespace import recompute_command

# Images used to estimate the per-channel feature statistics the refiner normalises with.
STATS_IMAGES = 32


@dataclass
class FeatureBatch:
    """A batch of images: features stacked, boxes per image (encoder-input pixels).

    `errors` names the images whose features could not be used (unreadable or non-finite); they are
    left out of the tensors, and the training loop stops on them with that message.
    """

    indices: list[int]  # positions in the dataset
    embedding: Tensor  # B x 256 x 64 x 64 float16
    early: Tensor  # B x C x 64 x 64 float16
    errors: list[str]
    plane: Tensor | None = None  # B x 3 x 256 x 256 uint8: the entries' stride-4 planes, when read

    def pin_memory(self) -> FeatureBatch:
        self.embedding = self.embedding.pin_memory()
        self.early = self.early.pin_memory()
        if self.plane is not None:
            self.plane = self.plane.pin_memory()
        return self


class FeatureDataset(Dataset):
    """One item per image: {index, embedding (256 x 64 x 64), early (C x 64 x 64)}, float16 numpy arrays, and
    with `with_plane` its stride-4 plane (3 x 256 x 256 uint8).

    Features stay float16 on the way to the training process (half the bytes); the model upcasts. The
    boxes stay with the split (`images`), which the trainer has already. An entry that cannot be read or
    fails its digest (a damaged store) becomes {index, error: message}: raised in a worker process it
    would reach the trainer as a multi-line traceback, not one line.
    """

    def __init__(self, store_url: str, fingerprint: str, images: list[ImageBoxes], with_plane: bool = False) -> None:
        self.store_url = store_url
        self.fingerprint = fingerprint
        self.images = images
        self.with_plane = with_plane
        self._namespace: Namespace | None = None  # opened on first read, in the reading process

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_namespace": None}  # never ship an open store to a worker

    def namespace(self) -> Namespace:
        if self._namespace is None:
            self._namespace = Namespace(FeatureStore(self.store_url), self.fingerprint)
        return self._namespace

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = self.images[index]
        try:
            embedding, early, plane = self.namespace().read_inputs(image.entry, with_plane=self.with_plane, check=True)
        except RefineError as error:
            where = f"image id={image.image_id} {image.file_name!r}"
            return {"index": index, "error": f"{error} ({where}); {recompute_command(self.store_url)}"}
        item = {"index": index, "embedding": embedding, "early": early}
        return {**item, "plane": plane} if self.with_plane else item


def collate_features(items: list[dict[str, Any]]) -> FeatureBatch:
    """Stack the items' features: the one copy on their way from the page cache to the model."""
    good = [item for item in items if "error" not in item]
    nothing = torch.empty(0)  # a batch of damaged entries only: the trainer stops on its errors
    return FeatureBatch(
        indices=[item["index"] for item in good],
        embedding=torch.from_numpy(np.stack([item["embedding"] for item in good])) if good else nothing,
        early=torch.from_numpy(np.stack([item["early"] for item in good])) if good else nothing,
        errors=[item["error"] for item in items if "error" in item],
        plane=torch.from_numpy(np.stack([item["plane"] for item in good])) if good and "plane" in good[0] else None,
    )


def feature_loader(
    dataset: FeatureDataset, batch_size: int, workers: int, sampler: Sampler[int] | None = None, pin: bool = False
) -> DataLoader:
    """Batches of whole images in `sampler` order (or dataset order); workers are forkserver processes.

    The fork server imports this module (torch, zarr) once, so each worker it forks starts in
    milliseconds instead of re-importing them; it never opens a store, so forking from it is safe.
    """
    if workers > 0:
        multiprocessing.set_forkserver_preload([__name__])
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate_features,
        pin_memory=pin,
        persistent_workers=workers > 0,
        prefetch_factor=2 if workers > 0 else None,
        multiprocessing_context="forkserver" if workers > 0 else None,
    )


def feature_statistics(dataset: FeatureDataset, limit: int = STATS_IMAGES) -> dict[str, Tensor]:
    """Channel mean and covariance of both features over the image area of up to `limit` images.

    The padded part of the encoder input is left out: it is the same for every image and would pull the
    statistics towards the padding's features. Returns {embedding_mean (256,), embedding_cov (256 x 256),
    early_mean (C,), early_cov (C x C)}, float64.
    """
    count = len(dataset)
    picks = np.unique(np.linspace(0, count - 1, num=min(limit, count)).round().astype(int))
    sums: dict[str, Tensor] = {}
    products: dict[str, Tensor] = {}
    cells = 0
    for index in picks.tolist():
        item = dataset[index]
        if "error" in item:
            raise RefineError(item["error"])
        height, width = (math.ceil(side / FEATURE_STRIDE) for side in dataset.images[index].resized_hw)
        for name in ("embedding", "early"):
            values = torch.tensor(item[name][:, :height, :width], dtype=torch.float64).flatten(1)  # C x cells
            sums[name] = sums.get(name, 0) + values.sum(dim=1)
            products[name] = products.get(name, 0) + values @ values.T
        cells += height * width
    stats: dict[str, Tensor] = {}
    for name in ("embedding", "early"):
        mean = sums[name] / cells
        stats[f"{name}_mean"] = mean
        stats[f"{name}_cov"] = products[name] / cells - torch.outer(mean, mean)
    return stats
