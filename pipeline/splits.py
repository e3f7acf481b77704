"""A split of a dataset from the feature store: every image's entry, ground-truth boxes and (optionally) coarse
boxes, in encoder-input pixels; and the coarse boxes a split's images get (its results file, or the noise
protocol). What `train` trains on and `evaluate` scores; nothing here opens an image or imports the encoder.

`load_split` joins a COCO annotation file with a dataset manifest of the store (by image id and file name)
and, optionally, a COCO results file of coarse boxes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from pipeline.boxes import coco_to_xyxy, jitter_boxes, match_to_ground_truth, noise_generator, to_input
from pipeline.coco import ImageRecord, load_coco, load_detections
from pipeline.errors import RefineError
from pipeline.manifest import manifest_images
from pipeline.store import Entry, FeatureStore, Namespace
from pipeline.store.layouts import LAYOUTS

# A detection counts as a coarse version of the ground-truth box it overlaps this much (IoU).
MATCH_IOU = 0.5


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
        namespace.manifest(dataset)  # fails clearly, listing the datasets it has
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
    manifest = namespace.manifest(dataset)
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
        _refuse_missing(missing, annotations, dataset, namespace.store.url)
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
        entry = _entry_of(
            image, listed.keys[by_id[image.id]], entries, annotations, f"{namespace.store.url}: dataset {dataset!r}"
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


def _refuse_missing(missing: list[ImageRecord], annotations: Path, dataset: str, store_url: str) -> None:
    examples = ", ".join(f"id={i.id} {i.file_name!r}" for i in missing[:3])
    raise RefineError(
        f"{annotations}: {len(missing)} image(s) are not in dataset {dataset!r} of {store_url} "
        f"(e.g. {examples}); run `refine extract --images <dir> --annotations {annotations} "
        f"--store {store_url} --dataset {dataset}`"
    )


def _entry_of(image: ImageRecord, key: str, entries: Mapping[str, Entry], annotations: Path, where: str) -> Entry:
    """The committed entry of an image the manifest lists (`where`: the store and dataset), of its size."""
    entry = entries.get(key)
    if entry is None:
        raise RefineError(
            f"{where} lists image id={image.id} {image.file_name!r} with key {key}, which the store does not hold; "
            "re-run `refine extract`"
        )
    if entry.original_size != (image.height, image.width):
        raise RefineError(
            f"{annotations}: image id={image.id} {image.file_name!r} is {image.width} x {image.height}, "
            f"but its stored features were made from a {entry.original_size[1]} x {entry.original_size[0]} "
            "image; re-run `refine extract`"
        )
    return entry


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
