"""The compacted entry index: a cache of the commit files that never changes what a reader sees."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.inference.apply import image_entries
from pipeline.coco import ImageRecord
from pipeline.hqsam.encoder import identity_for
from pipeline.errors import RefineError
from pipeline.store.layouts import CURRENT_LAYOUT, LEGACY_LAYOUT
from pipeline.store import Entry, FeatureStore, Namespace
from pipeline.store.index import INDEX_FILE
from pipeline.store.report import verify_store
from tests.helpers import write


def commit(namespace: Namespace, segment: str, keys: list[str], *, layout: int = CURRENT_LAYOUT, tag: str = "") -> None:
    """A commit file of `keys` in the store's real format (no arrays: only the index reads it)."""
    rows: list[list] = []
    for row, key in enumerate(keys):
        digest = f"{tag}{segment}-{key}"
        sizes = [100 + row, 200 + row, 512 + row, 1024]
        rows.append([key, row, *sizes, digest] + ([row * 10, row * 20] if layout == CURRENT_LAYOUT else []))
    value = {"segment": segment, "layout": layout, "entries": rows}
    if layout == CURRENT_LAYOUT:
        value |= {"shard_rows": 4, "early_channels": 8}
    namespace.store.write_json_atomic(f"{namespace.fingerprint}/commits/{segment}.json", value)


def reference(namespace: Namespace) -> dict[str, Entry]:
    """What a reader must see: every commit file parsed in segment order, the latest copy of a key winning."""
    found: dict[str, Entry] = {}
    for segment in namespace.commit_names():
        found.update((entry.key, entry) for entry in namespace.commit_entries(segment))
    return found


def reopen(namespace: Namespace) -> Namespace:
    """A fresh reader of the same namespace (another process would see the same)."""
    return Namespace(FeatureStore(namespace.store.url), namespace.fingerprint)


@pytest.fixture
def namespace(tmp_path: Path) -> Namespace:
    store = FeatureStore(tmp_path / "store.zarr", create=True)
    namespace = Namespace.ensure(store, {"fingerprint": "f" * 16, "early_channels": 8})
    commit(namespace, "0001-a", ["k1", "k2", "k3"], layout=LEGACY_LAYOUT)
    commit(namespace, "0002-b", ["k2", "k4"])  # k2 again: this later copy wins
    commit(namespace, "0003-c", ["k5", "k1"])
    return namespace


def test_the_compacted_index_is_used_and_equals_a_scan_of_the_commit_files(namespace: Namespace) -> None:
    expected = reference(namespace)
    assert namespace.write_index() == len(expected) == 5
    reader = reopen(namespace)
    entries, damaged = reader.scan()
    assert reader.index_status == "used" and damaged == []
    assert dict(entries.items()) == expected
    assert entries["k2"].segment == "0002-b" and entries["k1"].segment == "0003-c"  # latest wins
    assert entries["k3"].layout == LEGACY_LAYOUT and entries["k4"].offsets == (10, 20)
    assert entries.get("nope") is None and "nope" not in entries and "k4" in entries and len(entries) == 5
    with pytest.raises(KeyError):
        entries["nope"]
    assert sorted(entries) == sorted(expected) and sorted(entries.values()) == sorted(expected.values())
    assert entries.positions(["k4", "nope", "k"]).tolist()[1:] == [-1, -1]
    assert entries.entry_at(int(entries.positions(["k4"])[0])) == expected["k4"]


def test_commits_after_the_index_are_read_on_top_of_it_latest_segment_winning(namespace: Namespace) -> None:
    namespace.write_index()
    commit(namespace, "0004-d", ["k3", "k6"])  # a new segment: its k3 beats the indexed one
    commit(namespace, "0000-z", ["k1", "k7"])  # an older name the index does not cover: its k1 loses
    reader = reopen(namespace)
    entries, _ = reader.scan()
    assert reader.index_status == "used"
    assert dict(entries.items()) == reference(namespace)
    assert entries["k3"].segment == "0004-d" and entries["k1"].segment == "0003-c" and "k7" in entries


@pytest.mark.parametrize("change", ["rewritten", "removed"])
def test_a_covered_commit_that_changed_or_went_makes_the_index_stale(namespace: Namespace, change: str) -> None:
    namespace.write_index()
    if change == "rewritten":  # as gc does when it drops a duplicate: fewer rows, same segment
        commit(namespace, "0002-b", ["k4"], tag="new-")
    else:
        Path(namespace.store.path(namespace.fingerprint, "commits", "0002-b.json")).unlink()
    reader = reopen(namespace)
    entries, _ = reader.scan()
    assert reader.index_status.startswith("stale")
    assert dict(entries.items()) == reference(namespace)
    assert entries["k2"].segment == "0001-a"  # the copy the index had resolved is no longer committed


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: data[: len(data) // 2],  # truncated
        lambda data: data[:-200] + bytes(b ^ 0xFF for b in data[-200:-100]) + data[-100:],  # bytes flipped
        lambda data: b"not an index at all",
    ],
)
def test_a_damaged_index_is_ignored(namespace: Namespace, damage) -> None:
    namespace.write_index()
    path = Path(namespace.store.path(namespace.fingerprint, INDEX_FILE))
    path.write_bytes(damage(path.read_bytes()))
    reader = reopen(namespace)
    entries, damaged = reader.scan()
    assert reader.index_status.startswith("damaged") and damaged == []
    assert dict(entries.items()) == reference(namespace)


def test_an_index_whose_columns_do_not_match_its_digest_is_ignored(namespace: Namespace) -> None:
    namespace.write_index()
    path = Path(namespace.store.path(namespace.fingerprint, INDEX_FILE))
    with np.load(path) as npz:
        arrays = {name: npz[name] for name in npz.files}
    arrays["row"] = arrays["row"] + 1  # a well-formed file with a wrong column
    np.savez(path, **arrays)
    reader = reopen(namespace)
    assert dict(reader.entries().items()) == reference(namespace)
    assert reader.index_status == "damaged: its contents do not match their digest"


def test_two_writers_and_the_index_verify_says_when_it_is_damaged(tmp_path: Path) -> None:
    store = FeatureStore(tmp_path / "store.zarr", create=True)
    namespace = Namespace.ensure(store, identity_for("vit_tiny", None).provenance())
    first = write(namespace, ["a1", "a2"], seed=1)
    write(namespace, ["b1", "a2"], seed=2)  # a second writer, its own segment, a later copy of a2
    namespace.write_index()
    embedding, early = np.zeros((1, 256, 64, 64), np.float16), np.ones((1, 160, 64, 64), np.float16)
    first.write_batch(["a3"], embedding, early, [(64, 64)], [(1024, 1024)])  # the first writer appends
    reader = reopen(namespace)
    entries = reader.entries()
    assert reader.index_status.startswith("stale")  # its commit file grew
    assert dict(entries.items()) == reference(namespace) and set(entries) == {"a1", "a2", "b1", "a3"}
    assert entries["a2"].segment == max(namespace.commit_names())
    for entry in entries.values():
        reader.read(entry, check=True)
    assert verify_store(FeatureStore(store.url))[1] == []
    Path(store.path(namespace.fingerprint, INDEX_FILE)).write_bytes(b"PK\x03\x04 damaged")
    checked, problems = verify_store(FeatureStore(store.url))
    assert checked == 4 and len(problems) == 1 and "compacted index is damaged" in problems[0]


def manifest(name: str, images: list[tuple[int, str, str]]) -> dict:
    return {
        "dataset": name,
        "images": [
            {"id": i, "file_name": f, "key": k, "original_size": [1, 1], "resized_size": [1, 1]} for i, f, k in images
        ],
    }


def test_image_entries_joins_datasets_to_the_index(namespace: Namespace) -> None:
    namespace.write_index()
    namespace.write_manifest(manifest("a", [(3, "c.jpg", "k3"), (1, "a.jpg", "k1"), (9, "gone.jpg", "missing")]))
    namespace.write_manifest(manifest("b", [(1, "a2.jpg", "k1"), (4, "d.jpg", "k4")]))  # id 1: the same image
    found = image_entries(reopen(namespace), None)
    assert sorted(found) == [1, 3, 4] and 9 not in found and "1" not in found and True not in found  # key unknown
    record, entry = found[3]
    assert entry == reference(namespace)["k3"]
    assert record == ImageRecord(3, "c.jpg", width=entry.original_size[1], height=entry.original_size[0])
    assert found[1][0].file_name == "a2.jpg"  # the later dataset's record, as before
    assert image_entries(reopen(namespace), "a").keys() == {1, 3}


def test_image_entries_refuses_an_id_that_means_two_images(namespace: Namespace) -> None:
    namespace.write_manifest(manifest("a", [(1, "a.jpg", "k1")]))
    namespace.write_manifest(manifest("b", [(1, "b.jpg", "k2")]))
    with pytest.raises(RefineError, match="image id 1 means different images"):
        image_entries(namespace, None)
    assert len(image_entries(namespace, "b")) == 1
