"""Use a trained refiner: refine the boxes of whole files (COCO results or COCO datasets) from the store."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pipeline.boxes import coco_to_xyxy, to_input, to_original, valid_boxes, xyxy_to_coco
from pipeline.checkpoints import load_checkpoint, refiner_from_checkpoint
from pipeline.coco import BoxFile, ImageRecord, check_box, read_json
from pipeline.errors import RefineError
from pipeline.refiner import SimilarityCascadeRefiner
from pipeline.store import Entry, FeatureStore, Namespace


def load_model(path: Path, store: FeatureStore) -> tuple[SimilarityCascadeRefiner, Namespace, dict[str, Any]]:
    """The refiner of a checkpoint, the store namespace of the encoder it was trained on, the checkpoint."""
    if not path.is_file():
        raise RefineError(f"{path}: model checkpoint not found; run `refine train` first")
    checkpoint = load_checkpoint(path)
    fingerprint = checkpoint["fingerprint"]
    if fingerprint not in store.fingerprints():
        known = ", ".join(store.fingerprints()) or "none"
        raise RefineError(
            f"{path}: was trained on features of encoder {fingerprint} ({checkpoint['encoder']['model_type']}), "
            f"but {store.url} holds none of them (it has: {known}); extract with that encoder first"
        )
    return refiner_from_checkpoint(checkpoint), store.namespace(fingerprint), checkpoint


@torch.inference_mode()
def refine_boxes(
    model: SimilarityCascadeRefiner, namespace: Namespace, entry: Entry, boxes: Tensor, device: torch.device
) -> Tensor:
    """Refine one image's boxes (N x 4 xyxy, original pixels) from one read of its features.

    Returns N x 4 valid xyxy boxes in original pixels inside the image (see `valid_boxes`).
    """
    if boxes.numel() == 0:
        return boxes.reshape(0, 4)
    embedding, early = namespace.read(entry, check=True)  # never refine from damaged features
    inputs = to_input(boxes.float(), entry.original_size, entry.resized_size)
    (refined,) = model(
        torch.tensor(embedding[None], dtype=torch.float32, device=device),  # the stored arrays are read-only
        torch.tensor(early[None], dtype=torch.float32, device=device),
        [inputs.to(device)],
    )
    refined = to_original(refined.float().cpu(), entry.original_size, entry.resized_size)
    return valid_boxes(refined, boxes, entry.original_size)


def image_entries(namespace: Namespace, dataset: str | None) -> dict[Any, tuple[ImageRecord, Entry]]:
    """Image id -> (record, entry) over one dataset of the namespace, or over all of them when unambiguous."""
    names = [dataset] if dataset else namespace.dataset_names()
    entries = namespace.entries()
    found: dict[Any, tuple[ImageRecord, Entry]] = {}
    for name in names:
        for image in namespace.dataset(name)["images"]:
            entry = entries.get(image["key"])
            if entry is None:
                continue
            height, width = entry.original_size
            record = ImageRecord(image["id"], image["file_name"], width, height)
            previous = found.get(image["id"])
            if previous is not None and previous[1].key != entry.key:
                raise RefineError(
                    f"{namespace.store.url}: image id {image['id']} means different images in different "
                    "datasets; name the one to use with --dataset"
                )
            found[image["id"]] = (record, entry)
    return found


def apply_to_file(
    model: SimilarityCascadeRefiner,
    namespace: Namespace,
    boxes_path: Path,
    dataset: str | None,
    device: torch.device,
) -> tuple[Any, int]:
    """Refine every box of a COCO results list or COCO dataset; returns (same structure, boxes refined).

    Every field but `bbox` is kept, nothing is dropped and the order is kept.
    """
    data = read_json(boxes_path)
    boxes_file = BoxFile.parse(boxes_path, data, datasets=True)
    known = image_entries(namespace, dataset)
    by_image: dict[Any, list[int]] = {}
    missing: set = set()
    for index, record, image_id in boxes_file.checked():
        if image_id not in known:
            missing.add(image_id)
            continue
        check_box(record.get("bbox"), known[image_id][0], boxes_file.where(index, record))
        by_image.setdefault(image_id, []).append(index)
    if missing:
        listed = ", ".join(str(i) for i in sorted(missing)[:10]) + (" ..." if len(missing) > 10 else "")
        raise RefineError(
            f"{boxes_path}: {len(missing)} image id(s) have no features in {namespace.store.url} "
            f"for encoder {namespace.fingerprint}: {listed}; run `refine extract --images <dir> "
            f"--annotations <their COCO file> --store {namespace.store.url}` first"
        )
    output = copy.deepcopy(data)
    out_records = output if isinstance(output, list) else output["annotations"]
    model = model.to(device)
    for image_id, indices in by_image.items():
        coarse = coco_to_xyxy([boxes_file.records[i]["bbox"] for i in indices])
        refined = xyxy_to_coco(refine_boxes(model, namespace, known[image_id][1], coarse, device))
        for index, box in zip(indices, refined, strict=True):
            out_records[index]["bbox"] = [round(v, 2) for v in box]
    return output, sum(len(i) for i in by_image.values())
