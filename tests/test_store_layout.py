"""Segment layouts: the direct read equals zarr's, damage is caught, stores of the older layout keep working
and `store migrate` moves them to the current one without losing or changing a byte."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.inference.apply import image_entries
from pipeline.splits import load_split
from pipeline.errors import RefineError
from pipeline.store import Entry, FeatureStore, Namespace
from pipeline.store.commit import CommitFile
from pipeline.store.layouts import CURRENT_LAYOUT, EARLY, LAYOUTS, LEGACY_LAYOUT, RAW_LAYOUT
from pipeline.store.legacy import legacy_manifest, mark_version_1, write_legacy_segment
from pipeline.store.shards import shard_file
from stages.store import DEFAULT_GRACE_S
from tests.helpers import orphans


def features(store: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    opened = FeatureStore(store)
    namespace = Namespace.open(opened, opened.fingerprints()[0])
    return {key: namespace.read(entry, check=True) for key, entry in namespace.entries().items()}


def joins(store: Path, annotations: Path) -> tuple[dict[int, str], list[int]]:
    """What `apply` (image id -> key) and `train` (image ids of the split) make of the dataset's manifest."""
    opened = FeatureStore(store)
    namespace = Namespace.open(opened, opened.fingerprints()[0])
    by_apply = {image_id: pair[1].key for image_id, pair in image_entries(namespace, None).items()}
    return by_apply, [image.image_id for image in load_split(namespace, "train", annotations).images]


def make_legacy(store: Path) -> None:
    """Rewrite a store's namespace as the refine before segment layouts wrote it (pipeline/store/legacy.py)."""
    old = features(store)
    opened = FeatureStore(store)
    fingerprint = opened.fingerprints()[0]
    shutil.rmtree(store / fingerprint / "segments")
    shutil.rmtree(store / fingerprint / "commits")
    (manifest_file,) = (store / fingerprint / "datasets").glob("*.json")
    manifest = legacy_manifest(json.loads(manifest_file.read_text()))
    manifest_file.write_text(json.dumps(manifest))
    sizes = {image["key"]: (image["original_size"], image["resized_size"]) for image in manifest["images"]}
    keys = list(old)
    write_legacy_segment(
        opened,
        fingerprint,
        "00000000000000000001-legacy00",
        keys,
        np.stack([old[key][0] for key in keys]),
        np.stack([old[key][1] for key in keys]),
        [sizes[key] for key in keys],
    )
    mark_version_1(opened)


def test_direct_read_equals_zarrs_own_decoding(base_dataset) -> None:
    store = FeatureStore(base_dataset["store"])
    namespace = Namespace.open(store, store.fingerprints()[0])
    for entry in namespace.entries().values():
        assert entry.layout == CURRENT_LAYOUT
        embedding, early = namespace.read(entry, check=True)
        through_zarr = namespace.read_through_zarr(entry)
        assert np.array_equal(embedding, through_zarr[0]) and np.array_equal(early, through_zarr[1])
        assert embedding.shape == (256, 64, 64) and early.shape == (160, 64, 64) and early.dtype == np.float16
        assert not embedding.flags.writeable  # mapped from the page cache, never written through
        key = zarr.open_array(store.zarr_store, path=f"{namespace.fingerprint}/segments/{entry.segment}/early")
        shard = entry.row // entry.shard_rows
        expected = f"{namespace.fingerprint}/segments/{entry.segment}/early/" + key.metadata.encode_chunk_key(
            (shard, 0, 0, 0)
        )
        assert shard_file(namespace.fingerprint, entry.segment, EARLY, shard) == expected


def test_gc_default_in_the_cli_is_the_library_s() -> None:
    from pipeline.store.gc import DEFAULT_GRACE_S as library_default

    assert DEFAULT_GRACE_S == library_default


def test_a_damaged_shard_index_is_named_by_verify(cli, dataset) -> None:
    shard = sorted(dataset["store"].glob("*/segments/*/embedding/c/0/0/0/0"))[0]
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF  # inside zarr's shard index: the direct read does not use it, zarr's readers do
    shard.write_bytes(bytes(data))
    result = cli("store", "verify", dataset["store"])
    assert result.exit_code == 1 and "zarr cannot decode it" in result.stderr


def test_an_entry_moved_inside_its_shard_fails_its_digest(cli, dataset) -> None:
    commit_file = next(dataset["store"].glob("*/commits/*.json"))
    commit = json.loads(commit_file.read_text())
    first, second = commit["entries"][0], commit["entries"][1]
    first[-1], second[-1] = second[-1], first[-1]  # early-feature offsets swapped: valid bytes, wrong entry
    commit_file.write_text(json.dumps(commit))
    result = cli("store", "verify", dataset["store"])
    assert result.exit_code == 1
    assert f"entry {first[0]}" in result.stderr and "does not match its recorded digest" in result.stderr


def test_a_store_of_the_older_layout_reads_verifies_and_migrates(cli, dataset) -> None:
    store = dataset["store"]
    before = features(store)
    make_legacy(store)

    legacy = features(store)  # read as it is, through zarr, digests checked
    assert legacy.keys() == before.keys()
    assert all(
        np.array_equal(legacy[k][0], before[k][0]) and np.array_equal(legacy[k][1], before[k][1]) for k in before
    )
    info = json.loads(cli("store", "info", store, "--json").stdout)
    assert info["version"] == 1
    assert [(layout["layout"], layout["entries"]) for layout in info["namespaces"][0]["layouts"]] == [
        (LEGACY_LAYOUT, 4)
    ]
    assert "store migrate" in info["namespaces"][0]["layouts"][0]["description"]
    assert cli("store", "verify", store).exit_code == 0
    joined = joins(store, dataset["annotations"])  # a version-1 manifest joins as before
    assert sorted(joined[0]) == [1, 2, 3, 4] and joined[1] == [1, 2, 3, 4]

    migrated = cli("store", "migrate", store)
    assert migrated.exit_code == 0, migrated.output
    assert "4 entr(ies) rewritten" in migrated.stdout and "store gc" in migrated.stdout
    info = json.loads(cli("store", "info", store, "--json").stdout)
    assert info["version"] == 3  # an older refine now refuses the store instead of misreading it
    # Migrate has no images: it rewrites into layout 2, and the planes of layout 3 are extract's to add.
    assert [(layout["layout"], layout["entries"]) for layout in info["namespaces"][0]["layouts"]] == [(RAW_LAYOUT, 4)]
    assert joins(store, dataset["annotations"]) == joined
    after = features(store)
    assert all(np.array_equal(after[k][0], before[k][0]) and np.array_equal(after[k][1], before[k][1]) for k in before)

    assert "0 entr(ies) rewritten" in cli("store", "migrate", store).stdout  # nothing left to do
    assert cli("store", "gc", store, "--grace", "0").exit_code == 0
    assert not list(store.glob("*/segments/*legacy*")) and orphans(store) == []
    assert cli("store", "verify", store).exit_code == 0


def test_a_newer_store_version_is_refused_in_one_line(cli, dataset) -> None:
    root = json.loads((dataset["store"] / "zarr.json").read_text())
    root["attributes"]["refine"]["version"] = 4
    (dataset["store"] / "zarr.json").write_text(json.dumps(root))
    result = cli("store", "info", dataset["store"])
    assert result.exit_code == 1 and "feature store version 4 is not supported" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("layout", [4])
def test_a_segment_of_an_unknown_layout_is_named(cli, dataset, layout: int) -> None:
    commit_file = next(dataset["store"].glob("*/commits/*.json"))
    commit = json.loads(commit_file.read_text())
    commit["layout"] = layout
    commit_file.write_text(json.dumps(commit))
    result = cli("store", "verify", dataset["store"])
    assert result.exit_code == 1 and f"has layout {layout}, which this refine cannot read" in result.stderr


def test_namespace_reads_need_no_zarr_array(base_dataset) -> None:
    """The read path `train` uses opens no zarr array (a zarr call per read is what cost 10 x)."""
    store = FeatureStore(base_dataset["store"])
    namespace = Namespace(store, store.fingerprints()[0])
    for entry in namespace.entries().values():
        namespace.read(entry, check=True)
    assert namespace.files._arrays == {}


def test_a_store_without_planes_is_refused_by_train_in_one_line_until_extract_adds_them(cli, dataset) -> None:
    store = dataset["store"]
    make_legacy(store)
    assert cli("store", "migrate", store).exit_code == 0  # layout 2: the features, no stride-4 planes
    older = dataset["root"] / "layout2.zarr"
    shutil.copytree(store, older)
    out = dataset["root"] / "refiner"
    args = ("train", "--store", store, "--annotations", dataset["annotations"], "--out", out, "--epochs", "1")
    refused = cli(*args, "--holdout", "0")
    assert refused.exit_code == 1 and len(refused.stderr.strip().splitlines()) == 1
    assert "have no stride-4 plane" in refused.stderr and "run `refine extract --images" in refused.stderr
    assert not out.exists()  # refused before anything was written
    assert cli(*args, "--holdout", "0", "--plane-pool", "0").exit_code == 0  # the refiner without it still trains

    extracted = cli("extract", "--images", dataset["images"], "--annotations", dataset["annotations"], "--store", store)
    assert extracted.exit_code == 0, extracted.output
    assert "4 entr(ies) recomputed to add their stride-4 planes" in extracted.output
    namespace = Namespace(FeatureStore(store), FeatureStore(store).fingerprints()[0])
    assert {entry.layout for entry in namespace.entries().values()} == {CURRENT_LAYOUT}
    trained = cli(*args, "--holdout", "0")
    assert trained.exit_code == 0, trained.output
    assert cli("store", "verify", store).exit_code == 0

    # apply with that refiner on the store without planes: one line naming the extract that adds them.
    written = dataset["root"] / "refined.json"
    applied = cli(
        "apply", "--store", older, "--boxes", dataset["annotations"], "--model", out / "model.pt", "--out", written
    )
    assert applied.exit_code == 1 and len(applied.stderr.strip().splitlines()) == 1, applied.output
    assert "has no stride-4 plane" in applied.stderr and "refine extract --images" in applied.stderr
    assert not written.exists()


def test_an_entry_plane_is_its_encoder_input_at_stride_4_and_its_digest_covers_it(cli, dataset) -> None:
    from pipeline.images import content_key, prepare, stride4_plane

    store = FeatureStore(dataset["store"])
    namespace = Namespace(store, store.fingerprints()[0])
    entries = namespace.entries()
    for path in dataset["files"]:
        pixels, _, _ = prepare(path)
        _, _, plane = namespace.read_with_plane(entries[content_key(path.read_bytes())], check=True)
        np.testing.assert_array_equal(plane, stride4_plane(pixels[None])[0])

    shard = next(dataset["store"].glob("*/segments/*/plane/c/0/0/0/0"))
    data = bytearray(shard.read_bytes())
    data[1000] ^= 0xFF  # inside row 0's plane, which starts the shard
    shard.write_bytes(bytes(data))
    result = cli("store", "verify", dataset["store"])
    assert result.exit_code == 1 and "does not match its recorded digest" in result.stderr


def test_only_the_layouts_module_decides_what_a_layout_number_means() -> None:
    repo = Path(__file__).resolve().parents[1]
    deciding = sorted(
        path.relative_to(repo).as_posix()
        for folder in ("pipeline", "stages")
        for path in (repo / folder).rglob("*.py")
        if re.search(r"layout\s*[!=]=", path.read_text())
    )
    assert deciding in ([], ["pipeline/store/layouts.py"])


@pytest.mark.parametrize("number", sorted(LAYOUTS))
def test_a_commit_file_of_every_layout_reads_back_as_written(number: int) -> None:
    layout = LAYOUTS[number]
    entry = Entry("k" * 32, "0001-a", 3, (480, 640), (768, 1024), "d" * 32, number, 4, 8, (4096, 8192))
    commit = CommitFile("0001-a", layout, 4, 8, {"device": "cpu"}, [layout.commit_row(entry)])
    again = CommitFile.parse(json.loads(json.dumps(commit.to_json())), "0001-a", "c.json")
    (read,) = again.entries()
    expected = entry if layout.mapped else entry._replace(shard_rows=0, early_channels=0, offsets=(0, 0))
    assert read == expected and again.computed_with == {"device": "cpu"}


def test_a_commit_file_of_an_unknown_layout_is_refused_in_one_line() -> None:
    with pytest.raises(RefineError, match=r"^c\.json has layout 9, which this refine cannot read; use a newer one$"):
        CommitFile.parse({"layout": 9, "entries": []}, "0001-a", "c.json")
