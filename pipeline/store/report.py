"""What `refine store info` and `refine store verify` report about a feature store."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

import numpy as np

from pipeline.errors import RefineError
from pipeline.manifest import manifest_images
from pipeline.store import Entry, FeatureStore, Namespace
from pipeline.store.layouts import LAYOUTS, all_finite
from pipeline.store.namespace import recompute_command


def store_info(store: FeatureStore) -> dict:
    """Namespaces with provenance, entry counts by segment layout, datasets and bytes on disk."""
    namespaces = []
    for fingerprint in store.fingerprints():
        namespace = Namespace(store, fingerprint)
        provenance = namespace.provenance
        entries = namespace.scan()[0]
        layouts = Counter(entries.layouts().tolist())
        namespaces.append(
            {
                "fingerprint": fingerprint,
                "encoder": provenance.get("model_type", "unknown"),
                "weights": provenance.get("weights_description", provenance.get("weights", "unknown")),
                "random_init": provenance.get("random_init"),
                "entries": len(entries),
                "layouts": [
                    {"layout": layout, "entries": count, "description": LAYOUTS[layout].description}
                    for layout, count in sorted(layouts.items())
                ],
                "datasets": namespace.dataset_names(),
                "bytes": store.bytes_on_disk(fingerprint),
                "created": provenance.get("created"),
                "provenance": provenance,
            }
        )
    return {"store": store.url, "version": store.version, "bytes": store.bytes_on_disk(), "namespaces": namespaces}


def verify_store(store: FeatureStore) -> tuple[int, list[str]]:
    """Read every committed entry and check it; returns (entries checked, problems found)."""
    problems: list[str] = []
    checked = 0
    for fingerprint in store.fingerprints():
        namespace = Namespace(store, fingerprint)
        try:
            channels = int(namespace.provenance["early_channels"])
        except (RefineError, KeyError, TypeError, ValueError) as error:
            problems.append(f"namespace {fingerprint}: unreadable metadata ({error})")
            continue
        entries, damaged_commits = namespace.scan()
        problems.extend(damaged_commits)  # their entries are unknown; every other commit is still checked
        if namespace.index_status.startswith("damaged"):
            problems.append(
                f"namespace {fingerprint}: the compacted index is {namespace.index_status}; it was ignored "
                "(every commit file was read instead) and `refine store gc` writes it again"
            )
        for entry in entries.values():
            checked += 1
            try:
                stored = namespace.read_stored(entry, check=True)
                embedding, early = stored[:2]
            except RefineError as error:
                problems.append(f"{error}; {recompute_command(store.url)}")
                continue
            where = f"namespace {fingerprint}: entry {entry.key}"
            if embedding.shape != (256, 64, 64) or early.shape != (channels, 64, 64):
                problems.append(f"{where}: shapes {embedding.shape} / {early.shape} are wrong")
            if embedding.dtype != np.float16 or early.dtype != np.float16:
                problems.append(f"{where}: dtype is not float16")
            if not (all_finite(embedding) and all_finite(early)):
                problems.append(f"{where}: holds NaN or inf")
            if LAYOUTS[entry.layout].mapped:
                problems.extend(_check_zarr_view(namespace, entry, stored, where))
        for name in namespace.dataset_names():
            problems.extend(_check_dataset(namespace, name, entries))
    return checked, problems


def _check_zarr_view(namespace: Namespace, entry: Entry, mapped: tuple[np.ndarray, ...], where: str) -> list[str]:
    """Zarr's own decoding (shard index and its crc32c) must give the bytes that `refine` reads directly
    (the embedding, the early feature and, in layout 3, the plane)."""
    try:
        through_zarr = namespace.read_through_zarr(entry)
    except Exception as error:  # zarr raises codec, key and value errors alike on damaged data
        return [f"{where}: zarr cannot decode it ({type(error).__name__}: {str(error)[:160]})"]
    if len(through_zarr) != len(mapped) or not all(map(np.array_equal, through_zarr, mapped)):
        return [f"{where}: zarr's shard index points elsewhere than the commit's offsets"]
    return []


def _check_dataset(namespace: Namespace, name: str, entries: Mapping[str, Entry]) -> list[str]:
    prefix = f"namespace {namespace.fingerprint}: dataset {name}"
    try:
        manifest = namespace.manifest(name)
        images = manifest_images(manifest, prefix)
    except RefineError as error:
        return [str(error)]
    problems = []
    if manifest.get("fingerprint") != namespace.fingerprint:
        problems.append(f"{prefix}: manifest names another fingerprint")
    for position, key in enumerate(images.keys):
        entry = entries.get(key)
        where = f"{prefix}: image id={images.ids[position]} ({images.file_names[position]})"
        if entry is None:
            problems.append(f"{where}: no committed entry for key {key}")
        elif (entry.original_size, entry.resized_size) != (
            images.original_size(position),
            images.resized_size(position),
        ):
            problems.append(f"{where}: sizes differ from the committed entry")
    return problems
