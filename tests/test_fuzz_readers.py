"""Fuzzing every reader of a file `refine` did not write this run: COCO annotations, results files, images
the store's records (commit files, the compacted index, dataset manifests, shard bytes) and a refiner's
train_metrics.json.

Each is fed random bytes, a valid file cut short at any length, a valid file with one byte changed, and
valid JSON of the wrong shape. Whatever it gets, a reader raises one RefineError line naming the file (and
the entry), or reads it correctly; a store that a damaged record sat in passes `store verify` once the
record is put back, and a damaged record is always reported by `verify`, never read as something else.
The PyTorch files are fuzzed in tests/test_torch_files.py.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from PIL import Image

from pipeline.coco import BORDER_SLACK, load_coco, load_detections
from pipeline.errors import RefineError
from pipeline.splits import load_split
from pipeline.images import load_rgb
from pipeline.model.train_metrics import TrainMetrics
from pipeline.store import Entry, FeatureStore, Namespace
from pipeline.store.index import INDEX_FILE
from pipeline.store.report import verify_store
from tests.fuzzing import (
    FUZZ,
    FUZZ_SLOW,
    assert_one_line_naming,
    damaged_bytes,
    damaged_json,
    flipped,
    replace_bytes,
    truncated,
)

VALID_COCO = {
    "images": [
        {"id": 1, "file_name": "a.png", "width": 100, "height": 80},
        {"id": 2, "file_name": "sub/b.jpg", "width": 64, "height": 64},
    ],
    "annotations": [
        {"id": 10, "image_id": 1, "category_id": 1, "bbox": [10, 12, 30.5, 20]},
        {"id": 11, "image_id": 1, "category_id": 2, "bbox": [0, 0, 100, 80]},
        {"id": 12, "image_id": 2, "category_id": 1, "bbox": [5, 5, 10, 10]},
    ],
    "categories": [{"id": 1, "name": "thing"}, {"id": 2, "name": "other"}],
}
VALID_RESULTS = [
    {"image_id": 1, "bbox": [8, 10, 34, 25], "score": 0.9, "category_id": 1},
    {"image_id": 2, "bbox": [-3, 4, 20, 90], "score": 0.5, "category_id": 1},
]

_FIGURES = {
    "count": 2,
    "mean_iou_coarse": 0.6,
    "mean_iou_refined": 0.8,
    "share_improved": 0.5,
    "share_worse": 0.5,
    "recall_at_iou": {
        "coarse": {"0.5": 1.0, "0.75": 0.0, "0.9": 0.0},
        "refined": {"0.5": 1.0, "0.75": 0.5, "0.9": None},
    },
}
VALID_TRAIN_METRICS = {
    "epoch": 8,
    "train_loss": 0.6,
    "abstention": {
        "min_score": 0.9,
        "max_worse": 0.03,
        "boxes": 64,
        "reached": True,
        "mean_iou": 0.8,
        "share_changed": 0.7,
        "share_worse": 0.02,
        "share_worse_bound": 0.03,
        "calibration": {"scale": 2.9, "bias": -5.1},
        "ridge": 0.01,
    },
    "val": {**_FIGURES, "abstained": _FIGURES},
}


def _coco_is_sound(coco) -> None:
    ids = [image.id for image in coco.images]
    assert len(ids) == len(set(ids))
    sizes = {image.id: (image.width, image.height) for image in coco.images}
    assert all(width >= 1 and height >= 1 for width, height in sizes.values())
    assert len({annotation.id for annotation in coco.annotations}) == len(coco.annotations)
    for annotation in coco.annotations:
        x, y, w, h = annotation.bbox
        width, height = sizes[annotation.image_id]
        assert all(math.isfinite(v) for v in annotation.bbox) and w > 0 and h > 0
        assert -BORDER_SLACK <= x and x + w <= width + BORDER_SLACK
        assert -BORDER_SLACK <= y and y + h <= height + BORDER_SLACK
    for image in coco.images:
        assert ".." not in image.file_name.replace("\\", "/").split("/") and not image.file_name.startswith("/")


@FUZZ
@given(data=damaged_json(VALID_TRAIN_METRICS))
def test_train_metrics_are_read_or_refused_in_one_line(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "train_metrics.json"
    path.write_bytes(data)
    try:
        metrics = TrainMetrics.read(path)
    except RefineError as error:
        assert_one_line_naming(error, str(path))
    else:  # read as typed fields, and written back exactly as they were: nothing dropped, nothing retyped
        assert metrics.to_json() == json.loads(data)


@FUZZ
@given(data=damaged_json(VALID_COCO))
@example(data=b"[" * 100_000 + b"]" * 100_000)  # valid JSON that made json.loads raise RecursionError
def test_coco_annotations_are_read_or_refused_in_one_line(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "annotations.json"
    path.write_bytes(data)
    try:
        coco = load_coco(path)
    except RefineError as error:
        assert_one_line_naming(error, path)
    else:
        _coco_is_sound(coco)


@FUZZ
@given(data=damaged_json(VALID_RESULTS))
def test_results_files_are_read_or_refused_in_one_line(tmp_path: Path, data: bytes) -> None:
    annotations = tmp_path / "annotations.json"
    annotations.write_text(json.dumps(VALID_COCO))
    path = tmp_path / "results.json"
    path.write_bytes(data)
    try:
        boxes, _ = load_detections(path, load_coco(annotations))
    except RefineError as error:
        assert_one_line_naming(error, path)
    else:
        sizes = {image["id"]: (image["width"], image["height"]) for image in VALID_COCO["images"]}
        for image_id, image_boxes in boxes.items():
            width, height = sizes[image_id]
            for x, y, w, h in image_boxes:  # clipped to the image, never refused for crossing its border
                assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= width and y + h <= height


def _image_bytes(format: str) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (12, 20, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=format)
    return buffer.getvalue()


IMAGES = {format: _image_bytes(format) for format in ("PNG", "JPEG")}


@FUZZ
@given(format=st.sampled_from(sorted(IMAGES)), data=st.data())
def test_images_are_decoded_or_refused_in_one_line(tmp_path: Path, format: str, data: st.DataObject) -> None:
    path = tmp_path / f"image.{format.lower()}"
    path.write_bytes(data.draw(damaged_bytes(IMAGES[format])))
    try:
        image = load_rgb(path)
    except RefineError as error:
        assert_one_line_naming(error, path)
    else:  # a flip the format does not check (a pixel, an unread chunk): still an 8-bit RGB image
        assert image.mode == "RGB" and image.width >= 1 and image.height >= 1


# -- the store's records ------------------------------------------------------------------------------------
def _namespace(store: Path) -> Namespace:
    opened = FeatureStore(store)
    return Namespace.open(opened, opened.fingerprints()[0])


def _reads(namespace: Namespace) -> dict[str, bytes]:
    """Key -> the bytes of each entry that reads back matching its digest; RefineError lines checked."""
    found = {}
    for entry in namespace.scan()[0].values():
        try:
            embedding, early = namespace.read(entry, check=True)
        except RefineError as error:
            assert_one_line_naming(error, namespace.store.url, f"entry {entry.key}")
        else:
            found[entry.key] = embedding.tobytes() + early.tobytes()
    return found


@dataclass
class StoreUnderDamage:
    """A private store without its compacted index (so that its commit files are read), what it holds, and
    the files a property damages; every example puts back what it damaged, and the store must pass
    `store verify` after the last."""

    path: Path
    fingerprint: str
    entries: dict[str, Entry]
    held: dict[str, bytes]  # key -> embedding and early bytes

    def file(self, *parts: str) -> Path:
        return self.path.joinpath(self.fingerprint, *parts)

    @property
    def holdings(self) -> dict[str, tuple]:
        return {key: (e.original_size, e.resized_size, self.held[key]) for key, e in self.entries.items()}

    @contextmanager
    def replaced(self, path: Path, data: bytes) -> Iterator[None]:
        before = replace_bytes(path, data)
        try:
            yield
        finally:
            path.write_bytes(before)


@pytest.fixture
def store_under_damage(dataset: dict) -> Iterator[StoreUnderDamage]:
    store = dataset["store"]
    namespace = _namespace(store)
    (store / namespace.fingerprint / INDEX_FILE).unlink(missing_ok=True)
    yield StoreUnderDamage(store, namespace.fingerprint, dict(namespace.scan()[0].items()), _reads(namespace))
    assert verify_store(FeatureStore(store))[1] == []  # put back, it is whole again: nothing was written


@FUZZ
@given(data=st.data())
def test_a_damaged_commit_file_is_reported_never_read_as_other_entries(
    store_under_damage: StoreUnderDamage, data: st.DataObject
) -> None:
    store = store_under_damage
    (commit,) = store.file("commits").glob("*.json")
    with store.replaced(commit, data.draw(damaged_json(json.loads(commit.read_text())))):
        opened = _namespace(store.path)
        scanned, damaged = opened.scan()
        for message in damaged:
            assert_one_line_naming(RefineError(message), commit.name, "refine store gc --drop-damaged")
        read_back = _reads(opened)
        # A row whose key changed still holds real features (its digest says so), but under a key no image
        # has: nothing reads it, and verify reports the key that went missing.
        assert set(read_back.values()) <= set(store.held.values())
        problems = verify_store(FeatureStore(store.path))[1]
        # What a reader takes from the store: which keys, their image sizes, their bytes. Any change to it
        # is reported; verify also reports changes that read the same (a row number the offsets ignore).
        holdings = {key: (e.original_size, e.resized_size, read_back.get(key)) for key, e in scanned.items()}
        if holdings != store.holdings or damaged:
            assert problems, "verify passed a commit file that changed what the store holds"


@FUZZ
@given(data=st.data())
def test_a_damaged_index_is_ignored_and_the_commit_files_read(
    store_under_damage: StoreUnderDamage, data: st.DataObject
) -> None:
    store = store_under_damage
    index = store.file(INDEX_FILE)
    if not index.exists():
        _namespace(store.path).write_index()
    with store.replaced(index, data.draw(damaged_bytes(index.read_bytes()))):
        opened = _namespace(store.path)
        assert dict(opened.entries().items()) == store.entries  # the index has a digest: never trusted damaged
        assert opened.index_status in ("used", "absent") or opened.index_status.startswith(("damaged", "stale"))


@FUZZ
@given(data=st.data())
def test_a_damaged_manifest_is_refused_in_one_line_or_read_as_written(
    store_under_damage: StoreUnderDamage, dataset: dict, data: st.DataObject
) -> None:
    store = store_under_damage
    manifest = store.file("datasets", "train.json")
    expected = [(key, store.entries[key]) for key in sorted(store.entries)]
    with store.replaced(manifest, data.draw(damaged_json(json.loads(manifest.read_text())))):
        try:
            split = load_split(_namespace(store.path), "train", dataset["annotations"])
        except RefineError as error:
            assert_one_line_naming(error, FeatureStore(store.path).url, "train")
        else:  # only what the annotations and the commit files agree with: the same images, the same entries
            assert sorted((image.entry.key, image.entry) for image in split.images) == expected
        verify_store(FeatureStore(store.path))  # reports, never raises


@FUZZ
@given(data=st.data())
def test_damaged_shard_bytes_are_refused_naming_the_entry_never_read_as_features(
    store_under_damage: StoreUnderDamage, data: st.DataObject
) -> None:
    store = store_under_damage
    shards = sorted(path for path in store.file("segments").rglob("c/*/*/*/*") if path.is_file())
    shard = data.draw(st.sampled_from(shards))
    valid = shard.read_bytes()
    damage = damaged_bytes(valid) if len(valid) < 4096 else st.one_of(truncated(valid), flipped(valid))
    with store.replaced(shard, data.draw(damage)):
        read_back = _reads(_namespace(store.path))
        assert all(store.held[key] == value for key, value in read_back.items())
        problems = verify_store(FeatureStore(store.path))[1]
        if len(read_back) < len(store.entries):
            assert problems


# -- nothing lost: a command fed a damaged input leaves the store as it was --------------------------------
def _files(store: Path) -> dict[str, bytes]:
    """Every file of the store but the compacted index, a cache that any run may write again (same rows)."""
    return {
        str(path.relative_to(store)): path.read_bytes()
        for path in sorted(store.rglob("*"))
        if path.is_file() and path.name != INDEX_FILE
    }


@pytest.fixture
def store_files(dataset: dict) -> Iterator[dict[str, bytes]]:
    before = _files(dataset["store"])
    yield before
    assert verify_store(FeatureStore(dataset["store"]))[1] == []


@FUZZ_SLOW
@given(data=st.data(), weights=st.binary(max_size=64))
def test_extract_fed_a_damaged_annotation_file_or_checkpoint_loses_nothing(
    cli, dataset: dict, store_files: dict[str, bytes], tmp_path: Path, data: st.DataObject, weights: bytes
) -> None:
    store = dataset["store"]
    annotations = tmp_path / "fuzzed.json"
    annotations.write_bytes(data.draw(damaged_json(json.loads(dataset["annotations"].read_text()))))
    checkpoint = tmp_path / "sam_hq_vit_tiny.pth"
    checkpoint.write_bytes(weights)
    for extra in ([], ["--checkpoint", str(checkpoint)]):
        args = ["--images", dataset["images"], "--annotations", annotations, "--store", store, "--workers", "0"]
        result = cli("extract", *args, *extra)
        assert result.exit_code in (0, 1) and "Traceback" not in result.output, result.output
        if result.exit_code == 1:
            assert sum(line.startswith("error:") for line in result.stderr.splitlines()) == 1, result.stderr
        # A run that succeeded may add its own dataset's manifest; nothing that was there changes.
        after = _files(store)
        assert {name: after.get(name) for name in store_files} == store_files
        assert verify_store(FeatureStore(store))[1] == []
