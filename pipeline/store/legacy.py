"""Stores as refine wrote them before segment layouts (layout 1, store version 1, manifest version 1): what
`store migrate` and the older-layout readers are tested against, and `bench/store_read.py`'s anchor. Never
called by a command. Mirrors that writer exactly: zstd-compressed sharded chunks, commit rows of seven fields
with a BLAKE2b digest and no layout field, manifests with a list of image objects."""

from __future__ import annotations


import numpy as np
import zarr
import zarr.codecs

from pipeline.manifest import manifest_images
from pipeline.store import FeatureStore
from pipeline.store.layouts import EARLY, EMBEDDING, LAYOUTS, LEGACY_LAYOUT
from pipeline.store.writer import SEGMENT_ROWS

LEGACY_COMPRESSOR = zarr.codecs.BloscCodec(cname="zstd", clevel=1, shuffle="shuffle", typesize=2)


def write_legacy_segment(
    store: FeatureStore,
    fingerprint: str,
    segment: str,
    keys: list[str],
    embeddings: np.ndarray,
    early: np.ndarray,
    sizes: list[tuple[list[int], list[int]]],
    shard_rows: int = 4,
) -> None:
    """One committed layout-1 segment holding `keys` (n x 256 x 64 x 64 and n x C x 64 x 64 float16)."""
    base = f"{fingerprint}/segments/{segment}"
    zarr.open_group(store.zarr_store, path=base, mode="w-")
    for name, values in ((EMBEDDING, embeddings), (EARLY, early)):
        channels = values.shape[1]
        array = zarr.create_array(
            store.zarr_store,
            name=f"{base}/{name}",
            shape=(SEGMENT_ROWS, channels, 64, 64),
            chunks=(1, channels, 64, 64),
            shards=(shard_rows, channels, 64, 64),
            dtype="float16",
            compressors=LEGACY_COMPRESSOR,
            fill_value=0,
            config={"write_empty_chunks": True},
        )
        array[: len(keys)] = values
    rows = [
        [key, row, *sizes[row][0], *sizes[row][1], LAYOUTS[LEGACY_LAYOUT].digest(embeddings[row], early[row])]
        for row, key in enumerate(keys)
    ]
    commit = {"segment": segment, "shard_rows": shard_rows, "early_channels": early.shape[1], "entries": rows}
    store.write_json_atomic(f"{fingerprint}/commits/{segment}.json", commit)


def mark_version_1(store: FeatureStore) -> None:
    """Set the root's version marker back to 1, as the older refine created it."""
    root = store.read_json("zarr.json")
    root["attributes"]["refine"]["version"] = 1
    store.write_json_atomic("zarr.json", root)


def legacy_manifest(manifest: dict) -> dict:
    """A manifest of the current version as the older refine wrote it (version 1: a list of image objects)."""
    images = manifest_images(manifest, "legacy")
    return {
        **manifest,
        "version": 1,
        "images": [
            {
                "id": int(images.ids[i]),
                "file_name": images.file_names[i],
                "key": images.keys[i],
                "original_size": list(images.original_size(i)),
                "resized_size": list(images.resized_size(i)),
            }
            for i in range(len(images))
        ],
    }
