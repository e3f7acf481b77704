"""COCO files: annotation datasets and box files (results lists), read and validated, failing with one line
that names the file and the entry."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

from pipeline.errors import RefineError

# A box may touch the border; allow rounding slack of a pixel before calling it outside the image.
BORDER_SLACK = 1.0


@dataclass(frozen=True)
class ImageRecord:
    id: int
    file_name: str
    width: int
    height: int


@dataclass(frozen=True)
class Annotation:
    id: int
    image_id: int
    category_id: int
    bbox: tuple[float, float, float, float]  # x, y, w, h in pixels


@dataclass
class CocoDataset:
    path: Path
    images: list[ImageRecord]
    annotations: list[Annotation]
    categories: list[dict[str, Any]] = field(default_factory=list)


def read_json(path: Path) -> Any:
    """Parse a JSON file; a missing or malformed file is a one-line error with the position."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RefineError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise RefineError(f"{path}: is a directory, expected a JSON file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise RefineError(f"{path}: cannot read ({error})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise RefineError(f"{path}:{error.lineno}:{error.colno}: malformed JSON ({error.msg})") from None
    except RecursionError:  # "[[[[..." thousands deep: valid JSON, but no annotation file looks like it
        raise RefineError(f"{path}: malformed JSON (nested too deeply)") from None


def load_coco(path: Path) -> CocoDataset:
    """Read a COCO dataset file and check every image and annotation entry."""
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise RefineError(f"{path}: not a COCO dataset (expected an object with an 'images' list)")
    images = [_image_record(path, i, entry) for i, entry in enumerate(data["images"])]
    by_id: dict[int, ImageRecord] = {}
    for image in images:
        if image.id in by_id:
            raise RefineError(f"{path}: duplicate image id {image.id} ({image.file_name})")
        by_id[image.id] = image
    raw_annotations = data.get("annotations", [])
    if not isinstance(raw_annotations, list):
        raise RefineError(f"{path}: 'annotations' must be a list")
    annotations = [_annotation(path, i, entry, by_id) for i, entry in enumerate(raw_annotations)]
    seen: set[int] = set()
    for annotation in annotations:
        if annotation.id in seen:
            raise RefineError(f"{path}: duplicate annotation id {annotation.id}")
        seen.add(annotation.id)
    categories = data.get("categories", [])
    return CocoDataset(path, images, annotations, categories if isinstance(categories, list) else [])


def _image_record(path: Path, index: int, entry: Any) -> ImageRecord:
    where = f"{path}: images[{index}]"
    if not isinstance(entry, dict):
        raise RefineError(f"{where}: expected an object")
    image_id = _integer(entry.get("id"), f"{where}: 'id'")
    where = f"{path}: image id={image_id}"
    file_name = entry.get("file_name")
    if not isinstance(file_name, str) or not file_name:
        raise RefineError(f"{where}: 'file_name' must be a non-empty string")
    check_relative_path(file_name, where)
    width = _integer(entry.get("width"), f"{where}: 'width'")
    height = _integer(entry.get("height"), f"{where}: 'height'")
    if width < 1 or height < 1:
        raise RefineError(f"{where}: size {width} x {height} must be at least 1 x 1")
    return ImageRecord(image_id, file_name, width, height)


def check_relative_path(file_name: str, where: str) -> None:
    """Paths in annotation files stay inside the image root: no absolute paths, no '..'."""
    pure = PurePosixPath(file_name.replace("\\", "/"))
    if pure.is_absolute() or ".." in pure.parts or (len(file_name) > 1 and file_name[1] == ":"):
        raise RefineError(f"{where}: file_name {file_name!r} escapes the image root")


def _annotation(path: Path, index: int, entry: Any, images: dict[int, ImageRecord]) -> Annotation:
    where = f"{path}: annotations[{index}]"
    if not isinstance(entry, dict):
        raise RefineError(f"{where}: expected an object")
    annotation_id = _integer(entry.get("id"), f"{where}: 'id'")
    where = f"{path}: annotation id={annotation_id}"
    image_id = _integer(entry.get("image_id"), f"{where}: 'image_id'")
    image = images.get(image_id)
    if image is None:
        raise RefineError(f"{where}: image_id {image_id} is not in 'images'")
    category_id = _integer(entry.get("category_id", 1), f"{where}: 'category_id'")
    bbox = check_box(entry.get("bbox"), image, where)
    return Annotation(annotation_id, image_id, category_id, bbox)


def check_box(raw: Any, image: ImageRecord, where: str) -> tuple[float, float, float, float]:
    """A ground-truth COCO [x, y, w, h] box: four finite numbers, positive size, inside the image."""
    x, y, w, h = _box_values(raw, where)
    if (
        x < -BORDER_SLACK
        or y < -BORDER_SLACK
        or x + w > image.width + BORDER_SLACK
        or y + h > image.height + BORDER_SLACK
    ):
        raise RefineError(
            f"{where}: 'bbox' {_short(raw)} lies outside image {image.id} ({image.width} x {image.height})"
        )
    return x, y, w, h


def coarse_box(raw: Any, image: ImageRecord, where: str) -> tuple[tuple[float, float, float, float], bool]:
    """A coarse COCO [x, y, w, h] box (a detection, a loose box) clipped to its image, and whether clipping
    changed it. Loose boxes and raw detector output cross the border all the time; a box that does not
    overlap the image at all is an error, like a non-finite or non-positive one."""
    x, y, w, h = _box_values(raw, where)
    x0, y0 = max(x, 0.0), max(y, 0.0)
    x1, y1 = min(x + w, float(image.width)), min(y + h, float(image.height))
    if x1 <= x0 or y1 <= y0:
        raise RefineError(
            f"{where}: 'bbox' {_short(raw)} does not overlap image {image.id} ({image.width} x {image.height})"
        )
    clipped = (x0, y0, x1 - x0, y1 - y0)
    return clipped, clipped != (x, y, w, h)


def _box_values(raw: Any, where: str) -> tuple[float, float, float, float]:
    """Four finite numbers with a positive width and height, or a one-line error."""
    if not isinstance(raw, (list, tuple)) or len(raw) != 4:
        raise RefineError(f"{where}: 'bbox' must be [x, y, w, h], got {_short(raw)}")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in raw):
        raise RefineError(f"{where}: 'bbox' must hold numbers, got {_short(raw)}")
    x, y, w, h = (float(v) for v in raw)
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        raise RefineError(f"{where}: 'bbox' has a NaN or infinite value {_short(raw)}")
    if w <= 0 or h <= 0:
        raise RefineError(f"{where}: 'bbox' has zero or negative size {_short(raw)}")
    return x, y, w, h


@dataclass(frozen=True)
class BoxFile:
    """The box records of a COCO results list (`detection [i]`) or a COCO dataset's 'annotations'
    (`annotation id=N`), in file order, not yet checked."""

    path: Path
    records: list[Any]
    kind: str  # "detection" or "annotation"

    @classmethod
    def parse(cls, path: Path, data: Any, datasets: bool = False) -> BoxFile:
        """The records of `data` (the parsed `path`): a results list, or with `datasets` also a COCO dataset."""
        if isinstance(data, list):
            return cls(path, data, "detection")
        if datasets and isinstance(data, dict) and isinstance(data.get("annotations"), list):
            return cls(path, data["annotations"], "annotation")
        if datasets:
            raise RefineError(f"{path}: neither a COCO results list nor a COCO dataset with 'annotations'")
        raise RefineError(f"{path}: not a COCO results file (expected a list of detections)")

    def where(self, index: int, record: dict[str, Any]) -> str:
        """How an error names the record at `index`."""
        if self.kind == "detection":
            return f"{self.path}: detection [{index}]"
        return f"{self.path}: annotation id={record.get('id', index)}"

    def checked(self) -> Iterator[tuple[int, dict[str, Any], int]]:
        """(index, record, image id) of each record, checked to be an object with an integer image id."""
        for index, record in enumerate(self.records):
            if not isinstance(record, dict):
                raise RefineError(f"{self.where(index, {})}: expected an object")
            image_id = record.get("image_id")
            if isinstance(image_id, bool) or not isinstance(image_id, int):  # also keeps 1.0 from meaning image 1
                raise RefineError(f"{self.where(index, record)}: 'image_id' must be an integer, got {image_id!r}"[:200])
            yield index, record, image_id


def load_detections(path: Path, coco: CocoDataset) -> tuple[dict[int, list[tuple[float, float, float, float]]], int]:
    """A COCO results file (a list of {image_id, bbox, score, ...}) -> ([x, y, w, h] boxes by image id, each
    clipped to its image of `coco`; how many of them clipping changed)."""
    boxes_file = BoxFile.parse(path, read_json(path))
    images = {image.id: image for image in coco.images}
    boxes: dict[int, list[tuple[float, float, float, float]]] = {}
    clipped = 0
    for index, detection, image_id in boxes_file.checked():
        where = boxes_file.where(index, detection)
        image = images.get(image_id)
        if image is None:
            raise RefineError(f"{where}: image_id {image_id!r} is not in {coco.path}")
        box, changed = coarse_box(detection.get("bbox"), image, where)
        boxes.setdefault(image.id, []).append(box)
        clipped += changed
    return boxes, clipped


def _integer(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RefineError(f"{where} must be an integer, got {_short(value)}")
    return value


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else str(value)
    return text if len(text) <= 80 else text[:77] + "..."
