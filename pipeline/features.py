"""Training data from the feature store: one item per image = its stored features and its boxes.

`load_split` joins a COCO annotation file with a dataset manifest of the store (by image id and file name)
and, optionally, a COCO results file of coarse boxes; `FeatureDataset` reads each image's embedding and
early feature with one store read. Nothing here opens an image file or imports the encoder.

Zarr v3 runs an event loop and thread pools, and a process that forks after a store was opened can
deadlock; so the dataset opens its store lazily in the process that reads (never pickles it), and
`feature_loader` starts workers with forkserver.
"""

from __future__ import annotations

import math
import multiprocessing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from pipeline.boxes import coco_to_xyxy, jitter_boxes, match_to_ground_truth, noise_generator, to_input
from pipeline.coco import load_coco, load_detections
from pipeline.errors import RefineError
from pipeline.manifest import manifest_images
from pipeline.store.layouts import LAYOUTS
from pipeline.shapes import FEATURE_STRIDE
from pipeline.store import Entry, FeatureStore, Namespace
from pipeline.store.namespace import recompute_command

# A detection counts as a coarse version of the ground-truth box it overlaps this much (IoU).
MATCH_IOU = 0.5
# Images used to estimate the per-channel feature statistics the refiner normalises with.
STATS_IMAGES = 32


@dataclass(frozen=True)
class ImageBoxes:
    """One annotated image of a split: where its features are and its boxes in encoder-input pixels."""

    image_id: int
    file_name: str
    entry: Entry
    gt: Tensor  # N x 4 xyxy ground truth
    coarse: Tensor | None  # M x 4 xyxy coarse boxes from a results file (None: made by the noise protocol)
    coarse_target: Tensor | None  # M, index into `gt` of each coarse box's matched ground truth

    @property
    def original_hw(self) -> tuple[int, int]:
        return self.entry.original_size

    @property
    def resized_hw(self) -> tuple[int, int]:
        return self.entry.resized_size


@dataclass(frozen=True)
class Split:
    """The annotated images of one dataset, and what was left out (and why) for the summary."""

    dataset: str
    images: list[ImageBoxes]
    without_boxes: int  # images with no annotation (or no matched detection): nothing to learn from
    skipped_by_extract: int  # images `extract --skip-bad-images` could not read
    clipped_boxes: int = 0  # coarse boxes of the results file that crossed the image border, clipped to it

    @property
    def boxes(self) -> int:
        return sum(len(i.coarse) if i.coarse is not None else len(i.gt) for i in self.images)


def resolve_namespace(store: FeatureStore, dataset: str, fingerprint: str | None) -> Namespace:
    """The namespace holding `dataset`; with several candidates the caller must name a fingerprint."""
    if fingerprint is not None:
        namespace = Namespace.open(store, fingerprint)
        namespace.dataset(dataset)  # fails clearly, listing the datasets it has
        return namespace
    holders = [fp for fp in store.fingerprints() if dataset in Namespace(store, fp).dataset_names()]
    if not holders:
        known = sorted({name for fp in store.fingerprints() for name in Namespace(store, fp).dataset_names()})
        raise RefineError(
            f"{store.url}: no dataset {dataset!r} in the store (datasets: {', '.join(known) or 'none'}); "
            f"run `refine extract --images <dir> --annotations <{dataset}.json> --store {store.url}` first"
        )
    if len(holders) > 1:
        raise RefineError(
            f"{store.url}: dataset {dataset!r} was extracted by several encoders ({', '.join(holders)}); "
            "pick one with --fingerprint"
        )
    return Namespace(store, holders[0])


def load_split(namespace: Namespace, dataset: str, annotations: Path, coarse: Path | None = None) -> Split:
    """Join an annotation file with the store's manifest of `dataset` (and optional coarse detections).

    Every image of the annotation file must be in the manifest with the same id, file name and size;
    otherwise the error names the missing images and the `refine extract` command that adds them.
    """
    coco = load_coco(annotations)
    manifest = namespace.dataset(dataset)
    if manifest.get("fingerprint") != namespace.fingerprint:
        raise RefineError(
            f"{namespace.store.url}: dataset {dataset!r} manifest names encoder {manifest.get('fingerprint')}, "
            f"but lives in namespace {namespace.fingerprint}; re-run `refine extract`"
        )
    listed = manifest_images(manifest, f"{namespace.store.url}: dataset {dataset!r}")
    by_id = {image_id: position for position, image_id in enumerate(listed.ids.tolist())}
    skipped = listed.skipped
    missing = [
        image
        for image in coco.images
        if image.file_name not in skipped
        and (image.id not in by_id or listed.file_names[by_id[image.id]] != image.file_name)
    ]
    if missing:
        examples = ", ".join(f"id={i.id} {i.file_name!r}" for i in missing[:3])
        raise RefineError(
            f"{annotations}: {len(missing)} image(s) are not in dataset {dataset!r} of {namespace.store.url} "
            f"(e.g. {examples}); run `refine extract --images <dir> --annotations {annotations} "
            f"--store {namespace.store.url} --dataset {dataset}`"
        )
    entries = namespace.entries()
    gt_boxes: dict[int, list[tuple[float, float, float, float]]] = {}
    for annotation in coco.annotations:
        gt_boxes.setdefault(annotation.image_id, []).append(annotation.bbox)
    detections, clipped = load_detections(coarse, coco) if coarse is not None else ({}, 0)

    images: list[ImageBoxes] = []
    without_boxes = 0
    for image in coco.images:
        if image.file_name in skipped:
            continue
        key = listed.keys[by_id[image.id]]
        entry = entries.get(key)
        if entry is None:
            raise RefineError(
                f"{namespace.store.url}: dataset {dataset!r} lists image id={image.id} {image.file_name!r} "
                f"with key {key}, which the store does not hold; re-run `refine extract`"
            )
        if entry.original_size != (image.height, image.width):
            raise RefineError(
                f"{annotations}: image id={image.id} {image.file_name!r} is {image.width} x {image.height}, "
                f"but its stored features were made from a {entry.original_size[1]} x {entry.original_size[0]} "
                "image; re-run `refine extract`"
            )
        if image.id not in gt_boxes:
            without_boxes += 1
            continue
        gt = to_input(coco_to_xyxy(gt_boxes[image.id]), entry.original_size, entry.resized_size)
        coarse_boxes = coarse_target = None
        if coarse is not None:
            found = detections.get(image.id, [])
            candidates = to_input(coco_to_xyxy(found), entry.original_size, entry.resized_size)
            kept, coarse_target = match_to_ground_truth(candidates, gt, MATCH_IOU)
            if kept.numel() == 0:
                without_boxes += 1
                continue
            coarse_boxes = candidates[kept]
        images.append(ImageBoxes(image.id, image.file_name, entry, gt, coarse_boxes, coarse_target))
    if not images:
        raise RefineError(f"{annotations}: no image has a box to train or evaluate on")
    return Split(dataset, images, without_boxes, len(skipped), clipped)


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


def require_planes(store_url: str, splits: list[Split]) -> None:
    """Refuse, in one line naming the command that adds them, splits with entries of a layout without planes."""
    for split in splits:
        lacking = [image for image in split.images if not LAYOUTS[image.entry.layout].has_plane]
        if lacking:
            raise RefineError(
                f"{store_url}: {len(lacking)} image(s) of dataset {split.dataset!r} have no stride-4 plane (extracted "
                f"by an older refine; e.g. id={lacking[0].image_id} {lacking[0].file_name!r}), which the refiner's "
                f"fine stage reads: run `refine extract --images <dir> --annotations {split.dataset}.json --store "
                f"{store_url}` again (it adds them), or train without the fine stage (--plane-pool 0)"
            )


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


def coarse_and_targets(
    image: ImageBoxes, noise: float, seed: int, epoch: int | None, copies: int = 1
) -> tuple[Tensor, Tensor]:
    """An image's coarse boxes (M x 4) and the ground truth each should become (M x 4).

    From the results file when the split has one; otherwise `copies` noisy versions of every ground-truth
    box by the OA-MIL protocol, drawn for (seed, epoch, image) or, with epoch None, the fixed draw used
    for evaluation.
    """
    if image.coarse is not None and image.coarse_target is not None:
        return image.coarse, image.gt[image.coarse_target]
    targets = image.gt.repeat(copies, 1)
    return jitter_boxes(targets, image.resized_hw, noise, noise_generator(seed, image.image_id, epoch)), targets
