"""`extract`: encode every image of a dataset once into the feature store; a warm re-run only hashes.

The pipeline, each part overlapped with the encoder:
  DataLoader workers read each file once, hash it (keys already committed are hits) and decode,
  orient and resize the misses  ->  pinned memory, non-blocking copy  ->  encoder (batched, bf16 on
  CUDA, fused attention, optionally compiled)  ->  non-blocking copy to pinned memory  ->  writer
  threads (one on CPU, up to 4 on CUDA; bounded queue) wait for the copy and commit each batch to the
  writing thread's own store segment.
Meanwhile two threads read back each hit's entry and check its digest; a damaged entry (or one in a
damaged commit file) is never trusted: a second pass recomputes it.

Where the parts live: the image listing and the loader dataset in `pipeline.extract_images`, the batch size
and the encoder runner in `pipeline.extract_encoder`, the writer threads in `pipeline.extract_writer`, the
dataset manifest in `pipeline.manifest`; this module runs them and counts what happened.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import DataLoader

from pipeline import distributed
from pipeline.devices import resolve_device
from pipeline.encoder import EncoderIdentity, identity_for
from pipeline.errors import RefineError
from pipeline.extract_encoder import EncoderRunner, build_runner, computed_with, default_batch_size
from pipeline.extract_images import ImageDataset, ImageItem, ImageSample, collate_images, list_images
from pipeline.extract_writer import BackgroundWriter, writer_threads
from pipeline.jsonio import write_json
from pipeline.manifest import ManifestImage, Sizes, dataset_manifest
from pipeline.images import stride4_plane
from pipeline.store.layouts import LAYOUTS
from pipeline.store import Entry, FeatureStore, Namespace
from pipeline.store.writer import SegmentWriter


@dataclass
class ExtractConfig:
    images: Path
    store: str
    encoder: str = "vit_tiny"
    annotations: Path | None = None
    checkpoint: Path | None = None
    seed: int = 0
    device: str = "auto"
    batch_size: int | None = None
    workers: int | None = None
    dataset: str | None = None
    manifest_out: Path | None = None
    skip_bad_images: bool = False
    fused_attention: bool = True
    compile: bool = False
    check_hits: bool = True  # read back every committed entry the dataset uses; damaged ones are recomputed


@dataclass
class ExtractSummary:
    dataset: str
    fingerprint: str
    weights: str
    random_init: bool
    images: int = 0
    unique: int = 0
    hits: int = 0
    computed: int = 0
    failed: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)  # damaged entries and commit files found (recomputed)
    planes_added: int = 0  # entries of an older layout (no stride-4 plane) recomputed to add it
    wall_s: float = 0.0
    encoder_s: float = 0.0
    build_s: float = 0.0  # building the encoder (and loading its weights), once per run with a miss
    data_wait_s: float = 0.0
    bytes_written: int = 0


OnProgress = Callable[[str, int, int, ExtractSummary], None]  # (phase, done, total, counters so far)


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
    batch_size = config.batch_size or default_batch_size(identity.model_type, device, config.fused_attention)
    # Decoding and resizing cost a core several ms per image: a fast encoder on a GPU needs several workers.
    cores = (os.cpu_count() or 2) // distributed.local_world_size()  # the ranks on one machine share its cores
    workers = config.workers if config.workers is not None else min(8, max(1, cores - 1))
    run = _Extraction(config, identity, namespace, committed, summary, device, batch_size, progress, older)
    try:
        run.encode_misses(items, workers, "extract")
        damaged = run.damaged_hits()
        if damaged:
            # A damaged entry is never used: recompute it into a fresh segment, later than the damaged
            # copy's, so that every reader resolves the key to the new copy (latest wins).
            summary.repaired.extend(damaged.values())
            summary.hits -= len(damaged)
            for key in damaged:
                del committed[key], run.sizes[key]
            run.new_segment()
            run.encode_misses([item for item in items if item.key in damaged], 0, "repair")
    finally:
        run.close()
    sizes = run.sizes
    if run.encoder is not None:
        summary.encoder_s = run.encoder.seconds()
    if distributed.world_size() > 1:
        _merge_ranks(summary, namespace, sizes)

    for item in items:
        if item.key in sizes and item.size is not None and sizes[item.key][0] != item.size:
            (height, width), (want_height, want_width) = sizes[item.key][0], item.size
            summary.failed.append(
                f"{config.annotations}: image id={item.id} ({item.file_name}) is {width} x {height} after EXIF "
                f"orientation, but the annotations say {want_width} x {want_height}; its boxes would not fit"
            )
            del sizes[item.key]  # left out of the manifest
    summary.unique = len(run.seen)
    if main:
        summary.bytes_written = store.bytes_on_disk(identity.fingerprint) - bytes_before
    summary.wall_s = time.perf_counter() - started
    if summary.failed and not config.skip_bad_images:
        return summary  # the caller reports the failures; no manifest for an incomplete dataset
    if not main:
        return summary  # the main rank writes the one manifest
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
    namespace.write_dataset(manifest)
    namespace.write_index()  # `train` and `apply` then parse no commit file of this run
    if config.manifest_out is not None:
        write_json(config.manifest_out, manifest, sort_keys=True, what="the manifest")
    return summary


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


def _check_entry(namespace: Namespace, entry: Entry) -> str | None:
    """None if a committed entry reads back and matches its digest, else what is wrong with it."""
    try:
        namespace.read(entry, check=True)
    except RefineError as error:
        return str(error)
    return None


class _Extraction:
    """One `extract` run: the keys known so far, the encoder and writer (built on the first miss), and
    the background checks of the hits (each committed entry the dataset uses is read back once)."""

    def __init__(
        self,
        config: ExtractConfig,
        identity: EncoderIdentity,
        namespace: Namespace,
        committed: dict[str, Entry],
        summary: ExtractSummary,
        device: torch.device,
        batch_size: int,
        progress: OnProgress | None,
        older: frozenset[str] = frozenset(),
    ) -> None:
        self.config = config
        self.older = older  # keys committed in an older layout, recomputed when the dataset uses them
        self.identity = identity
        self.namespace = namespace
        self.committed = committed
        self.summary = summary
        self.device = device
        self.batch_size = batch_size
        self.progress = progress
        self.started = time.perf_counter()
        self.sizes: dict[str, Sizes] = {key: (e.original_size, e.resized_size) for key, e in committed.items()}
        self.seen: set[str] = set()
        self.share = distributed.share()  # the keys this rank encodes (all of them without torchrun)
        self.encoder: EncoderRunner | None = None  # built on the first miss: a warm re-run never builds it
        self.writer: BackgroundWriter | None = None
        # Reads decompress and hash outside the GIL: two threads keep up with the hashing workers.
        self.checker = (
            ThreadPoolExecutor(max_workers=2, thread_name_prefix="refine-check") if config.check_hits else None
        )
        self.checks: dict[str, Future[str | None]] = {}

    def encode_misses(self, items: list[ImageItem], workers: int, phase: str) -> None:
        """Hash every item; check hits in the background; encode and commit the misses."""
        loader = DataLoader(
            ImageDataset(items, frozenset(self.committed), self.share),
            batch_size=self.batch_size,
            num_workers=workers,
            collate_fn=collate_images,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=2 if workers else None,  # batches ahead per worker; more only fills shared memory
        )
        summary = self.summary
        done = 0
        wait_started = time.perf_counter()
        for samples, pixels in loader:
            summary.data_wait_s += time.perf_counter() - wait_started
            decoded = [s for s in samples if s.decoded]  # the order of `pixels`
            new: list[int] = []
            for i, sample in enumerate(decoded):
                if (
                    sample.key not in self.sizes
                ):  # neither committed nor encoded earlier: a file repeated is encoded once
                    self.sizes[sample.key] = (sample.original, sample.resized)
                    new.append(i)
            for sample in samples:
                items[sample.index].key = sample.key
                if sample.error is not None:
                    summary.failed.append(sample.error)
                elif sample.key not in self.seen:
                    self.seen.add(sample.key)
                    if sample.key in self.committed and self.share(sample.key):  # each rank checks its share
                        summary.hits += 1
                        if self.checker is not None:
                            self.checks[sample.key] = self.checker.submit(
                                _check_entry, self.namespace, self.committed[sample.key]
                            )
            if new:
                # Only a full batch comes pinned from the loader; a subset is a fresh pageable copy.
                self._encode([decoded[i] for i in new], pixels if len(new) == len(decoded) else pixels[new])
            done += len(samples)
            summary.wall_s = time.perf_counter() - self.started  # live, for the progress display
            if self.progress:
                self.progress(phase, done, len(items), summary)
            wait_started = time.perf_counter()

    def _encode(self, chosen: list[ImageSample], pixels: torch.Tensor) -> None:
        if self.encoder is None:
            build_started = time.perf_counter()
            config = self.config
            self.encoder = build_runner(
                self.identity,
                config.checkpoint,
                config.seed,
                self.device,
                self.batch_size,
                config.fused_attention,
                config.compile,
            )
            self.summary.build_s = time.perf_counter() - build_started
            how = computed_with(self.encoder, config.fused_attention, config.compile)
            self.writer = BackgroundWriter(
                lambda: SegmentWriter(self.namespace, self.identity.early_channels, self.batch_size, how),
                writer_threads(self.device),
            )
        embedding, early, ready = self.encoder(pixels, torch.tensor([s.resized for s in chosen]))
        assert self.writer is not None
        originals, resized_sizes = [s.original for s in chosen], [s.resized for s in chosen]
        planes = stride4_plane(pixels.numpy())  # from the encoder's own input: the plane is of the same frame
        self.writer.put([s.key for s in chosen], embedding, early, originals, resized_sizes, planes, ready)
        self.summary.computed += len(chosen)
        self.summary.planes_added += sum(s.key in self.older for s in chosen)

    def damaged_hits(self) -> dict[str, str]:
        """Key -> what is wrong, for every hit whose committed entry is unreadable or fails its digest."""
        found = {key: check.result() for key, check in self.checks.items()}
        self.checks.clear()
        return {key: message for key, message in found.items() if message is not None}

    def new_segment(self) -> None:
        if self.writer is not None:
            self.writer.new_segment()

    def close(self) -> None:
        if self.checker is not None:
            self.checker.shutdown(wait=True, cancel_futures=True)
        if self.writer is not None:
            self.writer.close()
