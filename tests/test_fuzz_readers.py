"""Fuzzing every reader of a file `refine` did not write this run: COCO annotations, results files, images
and the store's records (commit files, the compacted index, dataset manifests, shard bytes).

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
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from pipeline.coco import BORDER_SLACK, load_coco, load_detections
from pipeline.errors import RefineError
from pipeline.features import load_split
from pipeline.images import load_rgb
from pipeline.store import FeatureStore, Namespace
from pipeline.store_index import INDEX_FILE
from pipeline.store_report import verify_store
from tests.fuzzing import (
    FUZZ,
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
@given(data=damaged_json(VALID_COCO))
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


@pytest.mark.parametrize("format", ["PNG", "JPEG"])
def test_images_are_decoded_or_refused_in_one_line(tmp_path: Path, format: str) -> None:
    valid = _image_bytes(format)

    @FUZZ
    @given(data=damaged_bytes(valid))
    def decode(data: bytes) -> None:
        path = tmp_path / f"image.{format.lower()}"
        path.write_bytes(data)
        try:
            image = load_rgb(path)
        except RefineError as error:
            assert_one_line_naming(error, path)
        else:  # a flip the format does not check (a pixel, an unread chunk): still an 8-bit RGB image
            assert image.mode == "RGB" and image.width >= 1 and image.height >= 1

    decode()


# -- the store's records ------------------------------------------------------------------------------------
def _namespace(store: Path) -> Namespace:
    opened = FeatureStore(store)
    return opened.namespace(opened.fingerprints()[0])


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


@pytest.fixture
def damaged_store(dataset: dict) -> tuple[Path, Namespace, dict, dict[str, bytes]]:
    """A private store without its compacted index (so that its commit files are read), its entries and the
    bytes they hold."""
    store = dataset["store"]
    namespace = _namespace(store)
    (store / namespace.fingerprint / INDEX_FILE).unlink(missing_ok=True)
    entries = dict(namespace.scan()[0].items())
    return store, namespace, entries, _reads(namespace)


def _put_back_then_verify(store: Path) -> None:
    assert verify_store(FeatureStore(store))[1] == []


def test_a_damaged_commit_file_is_reported_never_read_as_other_entries(damaged_store, dataset) -> None:
    store, namespace, entries, held = damaged_store
    (commit,) = (store / namespace.fingerprint / "commits").glob("*.json")
    valid = json.loads(commit.read_text())

    @FUZZ
    @given(data=damaged_json(valid))
    def read(data: bytes) -> None:
        before = replace_bytes(commit, data)
        try:
            opened = _namespace(store)
            scanned, damaged = opened.scan()
            for message in damaged:
                assert_one_line_naming(RefineError(message), commit.name, "refine store gc --drop-damaged")
            read_back = _reads(opened)
            # A row whose key changed still holds real features (its digest says so), but under a key no image
            # has: nothing reads it, and verify reports the key that went missing.
            assert set(read_back.values()) <= set(held.values())
            problems = verify_store(FeatureStore(store))[1]
            if dict(scanned.items()) != entries or damaged:  # any change the reader took is reported
                assert problems, "verify passed a commit file that changed what the store holds"
            else:
                assert problems == []
        finally:
            commit.write_bytes(before)

    read()
    _put_back_then_verify(store)


def test_a_damaged_index_is_ignored_and_the_commit_files_read(damaged_store) -> None:
    store, namespace, entries, _ = damaged_store
    namespace.write_index()
    index = store / namespace.fingerprint / INDEX_FILE
    valid = index.read_bytes()

    @FUZZ
    @given(data=damaged_bytes(valid))
    def read(data: bytes) -> None:
        before = replace_bytes(index, data)
        try:
            opened = _namespace(store)
            assert dict(opened.entries().items()) == entries  # the index has a digest: never trusted damaged
            assert opened.index_status in ("used", "absent") or opened.index_status.startswith(("damaged", "stale"))
        finally:
            index.write_bytes(before)

    read()
    _put_back_then_verify(store)


def test_a_damaged_manifest_is_refused_in_one_line_or_read_as_written(damaged_store, dataset) -> None:
    store, namespace, entries, _ = damaged_store
    manifest = store / namespace.fingerprint / "datasets" / "train.json"
    valid = json.loads(manifest.read_text())
    expected = load_split(namespace, "train", dataset["annotations"])

    @FUZZ
    @given(data=damaged_json(valid))
    def read(data: bytes) -> None:
        before = replace_bytes(manifest, data)
        try:
            split = load_split(_namespace(store), "train", dataset["annotations"])
        except RefineError as error:
            assert_one_line_naming(error, FeatureStore(store).url, "train")
        else:  # only what the annotations and the commit files agree with: the same images, the same entries
            assert [(i.image_id, i.file_name, i.entry) for i in split.images] == [
                (i.image_id, i.file_name, i.entry) for i in expected.images
            ]
        finally:
            manifest.write_bytes(before)
        verify_store(FeatureStore(store))  # reports, never raises

    read()
    _put_back_then_verify(store)


def test_damaged_shard_bytes_are_refused_naming_the_entry_never_read_as_features(damaged_store) -> None:
    store, namespace, entries, held = damaged_store
    shards = sorted(path for path in (store / namespace.fingerprint / "segments").rglob("c/*/*/*/*") if path.is_file())
    assert shards

    @FUZZ
    @given(shard=st.sampled_from(shards), data=st.data())
    def read(shard: Path, data: st.DataObject) -> None:
        valid = shard.read_bytes()
        before = replace_bytes(shard, data.draw(damaged_bytes(valid) if len(valid) < 4096 else _big_damage(valid)))
        try:
            read_back = _reads(_namespace(store))
            assert all(held[key] == value for key, value in read_back.items())
            problems = verify_store(FeatureStore(store))[1]
            if len(read_back) < len(entries):
                assert problems
        finally:
            shard.write_bytes(before)

    read()
    _put_back_then_verify(store)


def _big_damage(valid: bytes) -> st.SearchStrategy[bytes]:
    """A shard of megabytes: cut short, or one byte changed (random bytes of that size say nothing more)."""
    return st.one_of(truncated(valid), flipped(valid))
