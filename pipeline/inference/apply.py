"""`refine apply` on whole files (COCO results or COCO datasets): every box through a box method of the
inference core (`pipeline.inference.core`), the file's structure kept."""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch import Tensor

from pipeline.boxes import coco_to_xyxy, xyxy_to_coco
from pipeline.coco import BoxFile, ImageRecord, coarse_box, read_json
from pipeline.errors import RefineError
from pipeline.inference.core import Proposal, Proposer, recommend
from pipeline.manifest import manifest_images
from pipeline.store import Entry, Namespace
from pipeline.store.index import EntryIndex


class ImageEntries(Mapping[int, tuple[ImageRecord, Entry]]):
    """Image id -> (record, entry) over columns: n ids sorted (int64), their file names and entry positions.

    A record and its entry are built when asked for: a dataset of a million images holds no million of each.
    """

    def __init__(self, entries: EntryIndex, ids: np.ndarray, file_names: list[str], positions: np.ndarray) -> None:
        self.entries, self.ids, self.file_names, self.positions = entries, ids, file_names, positions

    def _find(self, image_id: object) -> int:
        if (
            isinstance(image_id, bool)
            or not isinstance(image_id, (int, np.integer))
            or not -(2**63) <= image_id < 2**63
        ):
            return -1
        found = int(np.searchsorted(self.ids, image_id))
        return found if found < len(self.ids) and self.ids[found] == image_id else -1

    def __getitem__(self, image_id: int) -> tuple[ImageRecord, Entry]:
        found = self._find(image_id)
        if found < 0:
            raise KeyError(image_id)
        entry = self.entries.entry_at(int(self.positions[found]))
        height, width = entry.original_size
        return ImageRecord(int(self.ids[found]), self.file_names[found], width, height), entry

    def __contains__(self, image_id: object) -> bool:
        return self._find(image_id) >= 0

    def __len__(self) -> int:
        return len(self.ids)

    def __iter__(self) -> Iterator[int]:
        return iter(self.ids.tolist())


def image_entries(namespace: Namespace, dataset: str | None) -> ImageEntries:
    """Image id -> (record, entry) over one dataset of the namespace, or over all of them when unambiguous.

    Images whose key the store does not hold are left out.
    """
    names = [dataset] if dataset else namespace.dataset_names()
    entries = namespace.entries()
    ids: list[np.ndarray] = []
    positions: list[np.ndarray] = []
    file_names: list[str] = []
    for name in names:
        images = manifest_images(
            namespace.manifest(name), f"{namespace.store.url}: dataset {name!r} of encoder {namespace.fingerprint}"
        )
        found = entries.positions(images.keys)
        held = found >= 0
        ids.append(images.ids[held])
        file_names.extend(itertools.compress(images.file_names, held.tolist()))
        positions.append(found[held])
        del images  # one manifest's columns go before the next one is read
    all_ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    all_positions = np.concatenate(positions) if positions else np.zeros(0, np.int64)
    order = np.argsort(all_ids, kind="stable")  # one id's rows in dataset order: the last one is kept
    sorted_ids, sorted_positions = all_ids[order], all_positions[order]
    same = sorted_ids[1:] == sorted_ids[:-1]
    clash = same & (sorted_positions[1:] != sorted_positions[:-1])  # one position per key: another image
    if clash.any():
        raise RefineError(
            f"{namespace.store.url}: image id {int(sorted_ids[1:][clash][0])} means different images in different "
            "datasets; name the one to use with --dataset"
        )
    last = np.ones(len(order), bool)
    last[:-1] = ~same
    kept = order[last]
    return ImageEntries(entries, all_ids[kept], [file_names[i] for i in kept.tolist()], all_positions[kept])


@dataclass
class RefinedFile:
    """Every box of a COCO results list or dataset, refined: K boxes in file order (xyxy, original pixels).

    `order` gives each row's index in `box_file.records`.
    """

    data: Any  # the parsed file, untouched
    box_file: BoxFile
    order: list[int]  # K record indices
    images: list[ImageRecord]  # K: each box's image
    coarse: Tensor  # K x 4, clipped to the image
    refined: Tensor  # K x 4, what the method proposes
    score: Tensor  # K
    written: Tensor  # K x 4, what `refine` recommends: `refined`, or `coarse` where it is not trusted
    kept: Tensor  # K bools: the coarse box was kept (a score below the threshold, or no proposal)
    clipped: int  # coarse boxes that crossed the image border
    masks: list[dict[str, Any]] | None  # K COCO RLEs, from methods that make masks


def propose_file(
    propose: Proposer, namespace: Namespace, boxes_path: Path, dataset: str | None, min_score: float
) -> RefinedFile:
    """Propose a box for every box of a COCO results list or COCO dataset, one read per image."""
    data = read_json(boxes_path)
    box_file = BoxFile.parse(boxes_path, data, datasets=True)
    known = image_entries(namespace, dataset)
    by_image: dict[Any, list[int]] = {}
    coarse_boxes: dict[int, tuple[float, float, float, float]] = {}
    missing: set = set()
    clipped = 0
    for index, record, image_id in box_file.checked():
        if image_id not in known:
            missing.add(image_id)
            continue
        box, changed = coarse_box(record.get("bbox"), known[image_id][0], box_file.where(index, record))
        coarse_boxes[index] = box
        clipped += changed
        by_image.setdefault(image_id, []).append(index)
    if missing:
        listed = ", ".join(str(i) for i in sorted(missing)[:10]) + (" ..." if len(missing) > 10 else "")
        raise RefineError(
            f"{boxes_path}: {len(missing)} image id(s) have no features in {namespace.store.url} "
            f"for encoder {namespace.fingerprint}: {listed}; run `refine extract --images <dir> "
            f"--annotations <their COCO file> --store {namespace.store.url}` first"
        )
    order: list[int] = []
    images: list[ImageRecord] = []
    coarse_parts: list[Tensor] = []
    proposals: list[Proposal] = []
    for image_id, indices in by_image.items():
        record, entry = known[image_id]
        coarse = coco_to_xyxy([coarse_boxes[i] for i in indices])
        coarse_parts.append(coarse)
        proposals.append(propose(entry, coarse))
        order.extend(indices)
        images.extend([record] * len(indices))
    coarse = torch.cat(coarse_parts) if coarse_parts else torch.zeros(0, 4)
    refined = torch.cat([p.boxes for p in proposals]) if proposals else torch.zeros(0, 4)
    score = torch.cat([p.scores for p in proposals]) if proposals else torch.zeros(0)
    failed = torch.cat([p.failed for p in proposals]) if proposals else torch.zeros(0, dtype=torch.bool)
    written, kept = recommend(coarse, refined, score, min_score, failed)
    masks = [rle for p in proposals for rle in p.masks or []] if proposals and proposals[0].masks is not None else None
    return RefinedFile(data, box_file, order, images, coarse, refined, score, written, kept, clipped, masks)


@dataclass
class ApplySummary:
    """What `apply_file` did to a file's boxes."""

    boxes: int
    kept_coarse: int  # scored below the threshold: the coarse box stays
    clipped: int  # coarse boxes that crossed the image border, clipped to it
    area_updated: int  # COCO annotations whose `area` was their box's and now follows the new box


def apply_file(
    propose: Proposer, namespace: Namespace, boxes_path: Path, dataset: str | None, min_score: float
) -> tuple[Any, ApplySummary]:
    """Refine every box of a COCO results list or COCO dataset; returns (the same structure, what was done).

    Every input field is kept, nothing is dropped and the order is kept. Each record gets `bbox`, the box
    `refine` recommends (the coarse box clipped to the image where the score is below `min_score`), and
    `refine`: {"score", "coarse_bbox" (the box as given), "kept_coarse"}. An annotation's `area` follows the
    new box where it was the area of the old one and there is no segmentation it could have come from. A
    method that makes masks gives each box it changes its mask as COCO RLE `segmentation`, and its `area`.
    """
    result = propose_file(propose, namespace, boxes_path, dataset, min_score)
    output = copy.deepcopy(result.data)
    out_records = output if isinstance(output, list) else output["annotations"]
    area_updated = 0
    for row, (index, box, score, kept) in enumerate(
        zip(result.order, xyxy_to_coco(result.written), result.score.tolist(), result.kept.tolist(), strict=True)
    ):
        record = out_records[index]
        new_box = [round(v, 2) for v in box]
        if result.masks is not None and not kept:
            record["segmentation"] = result.masks[row]
            record["area"] = float(mask_utils.area(result.masks[row]))
        elif _area_is_the_box(record):
            record["area"] = round(new_box[2] * new_box[3], 2)
            area_updated += 1
        record["refine"] = {"score": round(score, 4), "coarse_bbox": record["bbox"], "kept_coarse": kept}
        record["bbox"] = new_box
    summary = ApplySummary(len(result.order), int(result.kept.sum()), result.clipped, area_updated)
    return output, summary


def _area_is_the_box(record: dict[str, Any]) -> bool:
    """Whether a record's `area` is its box's (to a rounding): pycocotools buckets objects by it, so it must
    not go stale. An area that came from a mask (a segmentation, or one smaller than its box) is left alone."""
    area, (_, _, w, h) = record.get("area"), record["bbox"]
    if record.get("segmentation") or isinstance(area, bool) or not isinstance(area, (int, float)):
        return False
    return math.isclose(float(area), float(w) * float(h), rel_tol=1e-3, abs_tol=0.5)
