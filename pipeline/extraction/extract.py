"""`extract`: encode every image of a dataset once into the feature store; a warm re-run only hashes.

The pipeline, each part overlapped with the encoder:
  DataLoader workers read each file once, hash it (keys already committed are hits) and decode,
  orient and resize the misses  ->  pinned memory, non-blocking copy  ->  encoder (batched, bf16 on
  CUDA, fused attention, optionally compiled)  ->  non-blocking copy to pinned memory  ->  writer
  threads (one on CPU, up to 4 on CUDA; bounded queue) wait for the copy and commit each batch to the
  writing thread's own store segment.
Meanwhile two threads read back each hit's entry and check its digest; a damaged entry (or one in a
damaged commit file) is never trusted: a second pass recomputes it.

Where the parts live: what a run is asked and reports in `pipeline.extraction.config`, the hits checked and
the misses encoded in `pipeline.extraction.session`, the image listing and the loader dataset in
`pipeline.extraction.image_files`, the batch size and the encoder runner in
`pipeline.extraction.encoder_runner`, the writer threads in `pipeline.extraction.writers`, the dataset manifest
in `pipeline.manifest`; this module runs them and counts what happened.
"""

from __future__ import annotations

import os
import time


from pipeline import distributed
from pipeline.devices import resolve_device, resolve_encoder_amp
from pipeline.hqsam.encoder import EncoderIdentity, identity_for
from pipeline.extraction.config import ExtractConfig, ExtractSummary, OnProgress
from pipeline.extraction.encoder_runner import default_batch_size
from pipeline.extraction.session import ExtractionRun
from pipeline.extraction.image_files import ImageItem, list_images
from pipeline.jsonio import write_json
from pipeline.manifest import ManifestImage, Sizes, dataset_manifest
from pipeline.store.layouts import LAYOUTS
from pipeline.store import FeatureStore, Namespace


def run_extract(config: ExtractConfig, progress: OnProgress | None = None) -> ExtractSummary:
    """Bring every image of the dataset into the store and write the dataset manifest."""
    started = time.perf_counter()
    dataset_name, items = list_images(config.images, config.annotations, config.dataset)
    identity = identity_for(config.encoder, config.checkpoint, config.seed)
    store = FeatureStore(config.store, create=True)
    namespace = Namespace.ensure(store, identity.provenance())
    summary = ExtractSummary(dataset_name, identity.fingerprint, identity.describe_weights(), identity.random_init)
    summary.images = len(items)
    main = distributed.is_main()
    bytes_before = store.bytes_on_disk(identity.fingerprint) if main else 0
    distributed.barrier()  # under torchrun: no rank writes before the main rank has measured the store
    scanned, damaged_commits = namespace.scan()
    # Extract keeps sizes by key anyway, and drops the damaged ones from it. An entry of an older layout has
    # no stride-4 plane and only the image can give it one: a miss, recomputed into the current layout.
    committed = {key: entry for key, entry in scanned.items() if LAYOUTS[entry.layout].has_plane}
    older = frozenset(key for key in scanned if key not in committed)
    summary.repaired.extend(damaged_commits)  # their entries are unknown, so they are misses: recomputed

    device = resolve_device(config.device)
    amp = resolve_encoder_amp(config.amp, device)
    batch_size = config.batch_size or default_batch_size(identity.model_type, device, config.fused_attention)
    # Decoding and resizing cost a core several ms per image: a fast encoder on a GPU needs several workers.
    cores = (os.cpu_count() or 2) // distributed.local_world_size()  # the ranks on one machine share its cores
    workers = config.workers if config.workers is not None else min(8, max(1, cores - 1))
    run = ExtractionRun(config, identity, namespace, committed, summary, device, amp, batch_size, progress, older)
    try:
        _encode_and_repair(run, items, workers)
    finally:
        run.close()
    sizes = run.sizes
    if run.encoder is not None:
        summary.encoder_s = run.encoder.seconds()
    if distributed.world_size() > 1:
        _merge_ranks(summary, namespace, sizes)

    _drop_misfits(config, items, sizes, summary)
    summary.unique = len(run.seen)
    if main:
        summary.bytes_written = store.bytes_on_disk(identity.fingerprint) - bytes_before
    summary.wall_s = time.perf_counter() - started
    if summary.failed and not config.skip_bad_images:
        return summary  # the caller reports the failures; no manifest for an incomplete dataset
    if not main:
        return summary  # the main rank writes the one manifest
    _write_manifest(config, identity, namespace, dataset_name, items, sizes)
    return summary


def _encode_and_repair(run: ExtractionRun, items: list[ImageItem], workers: int) -> None:
    """Encode the misses; then recompute every hit whose entry proved damaged."""
    run.encode_misses(items, workers, "extract")
    damaged = run.damaged_hits()
    if damaged:
        # A damaged entry is never used: recompute it into a fresh segment, later than the damaged copy's, so
        # that every reader resolves the key to the new copy (latest wins).
        run.summary.repaired.extend(damaged.values())
        run.summary.hits -= len(damaged)
        for key in damaged:
            del run.committed[key], run.sizes[key]
        run.new_segment()
        run.encode_misses([item for item in items if item.key in damaged], 0, "repair")


def _drop_misfits(
    config: ExtractConfig, items: list[ImageItem], sizes: dict[str, Sizes], summary: ExtractSummary
) -> None:
    """Fail (and leave out of the manifest) every image whose size is not the one its annotations give."""
    for item in items:
        if item.key in sizes and item.size is not None and sizes[item.key][0] != item.size:
            (height, width), (want_height, want_width) = sizes[item.key][0], item.size
            summary.failed.append(
                f"{config.annotations}: image id={item.id} ({item.file_name}) is {width} x {height} after EXIF "
                f"orientation, but the annotations say {want_width} x {want_height}; its boxes would not fit"
            )
            del sizes[item.key]


def _write_manifest(
    config: ExtractConfig,
    identity: EncoderIdentity,
    namespace: Namespace,
    dataset_name: str,
    items: list[ImageItem],
    sizes: dict[str, Sizes],
) -> None:
    """The dataset's manifest into the store (and a copy to `--manifest`), then the store's compacted index."""
    manifest = dataset_manifest(
        dataset_name,
        fingerprint=identity.fingerprint,
        encoder=identity.model_type,
        weights=identity.weights,
        early_channels=identity.early_channels,
        images=[
            ManifestImage(item.id, item.file_name, item.key, sizes[item.key]) for item in items if item.key in sizes
        ],
        skipped=[item.file_name for item in items if item.key not in sizes],
    )
    namespace.write_manifest(manifest)
    namespace.write_index()  # `train` and `apply` then parse no commit file of this run
    if config.manifest_out is not None:
        write_json(config.manifest_out, manifest, sort_keys=True, what="the manifest")


def _merge_ranks(summary: ExtractSummary, namespace: Namespace, sizes: dict[str, Sizes]) -> None:
    """Under torchrun, once every rank has committed its share: add up the ranks' counters and failures and
    learn the sizes of the entries the other ranks computed, so that every rank knows the whole dataset's
    outcome (and exits accordingly) and the main rank can write a complete manifest."""
    parts = distributed.all_gather(
        (summary.hits, summary.computed, summary.encoder_s, summary.failed, summary.repaired, summary.planes_added)
    )
    computed_here = summary.computed
    summary.hits = sum(part[0] for part in parts)
    summary.computed = sum(part[1] for part in parts)
    summary.encoder_s = sum(part[2] for part in parts)
    # A file that cannot be read fails on every rank (all hash it); list it once.
    summary.failed = list(dict.fromkeys(message for part in parts for message in part[3]))
    summary.repaired = list(dict.fromkeys(message for part in parts for message in part[4]))
    summary.planes_added = sum(part[5] for part in parts)
    if summary.computed > computed_here:
        for key, entry in namespace.scan()[0].items():
            sizes.setdefault(key, (entry.original_size, entry.resized_size))
