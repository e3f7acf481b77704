"""`extract`: encode every image of a dataset once into the feature store; a warm re-run only hashes.

The pipeline, each part overlapped with the encoder:
  DataLoader workers read each file once, hash it (keys already committed are hits) and decode,
  orient and resize the misses  ->  pinned memory, non-blocking copy  ->  encoder (batched, bf16 on
  CUDA, fused attention, optionally compiled)  ->  non-blocking copy to pinned memory  ->  writer
  threads (one on CPU, up to 4 on CUDA; bounded queue) wait for the copy and commit each batch to the
  writing thread's own store segment.
Meanwhile two threads read back each hit's entry and check its digest; a damaged entry (or one in a
damaged commit file) is never trusted: a second pass recomputes it.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pipeline import distributed
from pipeline.coco import load_coco
from pipeline.devices import resolve_device
from pipeline.encoder import EncoderIdentity, FeatureEncoder, build_encoder, identity_for
from pipeline.errors import RefineError
from pipeline.jsonio import write_json
from pipeline.images import IMAGE_SUFFIXES, content_key, prepare, read_file
from pipeline.store import Entry, FeatureStore, Namespace, SegmentWriter

MANIFEST_FORMAT = "refine-dataset-manifest"
CPU_BATCH = 4
# Largest default batch on CUDA: beyond it throughput no longer grows, while shards and host buffers do.
MAX_CUDA_BATCH = 64
# Peak CUDA memory per image in the encoder (bf16, fused attention), with about 2x headroom over an estimate
# of one block's activations plus the kept early features.
GIB_PER_IMAGE = {"vit_tiny": 0.25, "vit_b": 0.3, "vit_l": 0.4, "vit_h": 0.5}
# Without fused attention every global block also materialises heads x 4096 x 4096 scores (bf16 + fp32 softmax).
GIB_ATTENTION_MATRIX = {"vit_tiny": 0.0, "vit_b": 1.5, "vit_l": 2.0, "vit_h": 2.0}


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
    wall_s: float = 0.0
    encoder_s: float = 0.0
    build_s: float = 0.0  # building the encoder (and loading its weights), once per run with a miss
    data_wait_s: float = 0.0
    bytes_written: int = 0


@dataclass
class ImageItem:
    """One image of the dataset: its id and name in the annotations, its file, and (once hashed) its key."""

    id: int
    file_name: str
    path: Path
    size: tuple[int, int] | None = None  # (height, width) the annotations give, if any
    key: str = ""


Sizes = tuple[tuple[int, int], tuple[int, int]]  # (original, resized) as (height, width)


Progress = Callable[[str, int, int, ExtractSummary], None]  # (phase, done, total, counters so far)


def default_batch_size(model_type: str, device: torch.device, fused_attention: bool = True) -> int:
    """Images per encoder call: 4 on CPU; on CUDA the largest power of two whose activations fit in 70% of
    the free device memory, at most `MAX_CUDA_BATCH`."""
    if device.type != "cuda":
        return CPU_BATCH
    free_bytes, _ = torch.cuda.mem_get_info(device)
    per_image = GIB_PER_IMAGE[model_type] + (0.0 if fused_attention else GIB_ATTENTION_MATRIX[model_type])
    fits = int(0.7 * free_bytes / 2**30 / per_image)
    return max(1, min(MAX_CUDA_BATCH, 1 << max(0, fits.bit_length() - 1)))


def writer_threads(device: torch.device) -> int:
    """Threads committing batches: one keeps up with a CPU encoder; a GPU outruns one zarr write thread
    (about 600 MB/s of compressed shards on a 16-core host), so there it gets one per four cores, up to 4."""
    if device.type != "cuda":
        return 1
    return max(1, min(4, (os.cpu_count() or 1) // 4))


def list_images(config: ExtractConfig) -> tuple[str, list[ImageItem]]:
    """The dataset's name and images; with annotations exactly the images they list, each checked to exist."""
    if not config.images.is_dir():
        raise RefineError(f"{config.images}: image directory not found")
    if config.annotations is not None:
        coco = load_coco(config.annotations)
        items = [
            ImageItem(im.id, im.file_name, config.images / im.file_name, (im.height, im.width)) for im in coco.images
        ]
        for item in items:
            if not item.path.is_file():
                raise RefineError(
                    f"{config.annotations}: image id={item.id}: file {item.file_name!r} "
                    "not found under the image directory"
                )
        return config.dataset or config.annotations.stem, items
    files = sorted(p for p in config.images.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    items = [ImageItem(i, p.relative_to(config.images).as_posix(), p) for i, p in enumerate(files)]
    return config.dataset or config.images.name, items


@dataclass
class _Sample:
    """What a DataLoader worker hands back for one file: a hit (key only), a decoded miss, or an error."""

    index: int
    key: str
    decoded: bool = False  # a miss, decoded for the encoder
    pixels: np.ndarray | None = None  # 3 x 1024 x 1024 uint8 until collated
    original: tuple[int, int] = (0, 0)
    resized: tuple[int, int] = (0, 0)
    error: str | None = None


class _ImageDataset(Dataset):
    """Reads each file once in a DataLoader worker: hashes it, and decodes it only if its key is new and
    this rank's to encode (`mine`; under torchrun every rank hashes every file, each encodes its share).

    A file that cannot be decoded comes back as its error message, never raised, so one bad image
    does not stop the batch.
    """

    def __init__(self, items: list[ImageItem], committed: frozenset[str], mine: Callable[[str], bool]) -> None:
        self.items = items
        self.committed = committed
        self.mine = mine

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> _Sample:
        item = self.items[index]
        try:
            data = read_file(item.path)
            key = content_key(data)
            if key in self.committed or not self.mine(key):
                return _Sample(index, key)
            pixels, original, resized = prepare(item.path, data)
            return _Sample(index, key, True, pixels, original, resized)
        except RefineError as error:
            return _Sample(index, "", error=f"{error} [image id={item.id}]")


def _collate(samples: list[_Sample]) -> tuple[list[_Sample], torch.Tensor]:
    """Stack the decoded images in numpy: workers must not run torch kernels (OpenMP after fork can hang)."""
    decoded = [s for s in samples if s.decoded]
    pixels = np.stack([s.pixels for s in decoded]) if decoded else np.zeros((0, 3, 1, 1), np.uint8)
    for sample in decoded:
        sample.pixels = None  # travels once, in the stacked tensor (shared memory)
    return samples, torch.from_numpy(pixels)


class _BackgroundWriter:
    """Commits batches on threads behind the encoder; the bounded queue keeps the encoder from running
    far ahead of the disk. Errors surface in the main thread at the next `put` or at `close`.

    Each thread owns a SegmentWriter, so each writes its own segment as independent writers do (the store
    never has two writers on one segment); several threads keep a fast GPU from waiting on one zarr write.
    """

    def __init__(self, make_writer: Callable[[], SegmentWriter], threads: int = 1) -> None:
        self.writers = [make_writer() for _ in range(threads)]
        self.queue: queue.Queue = queue.Queue(maxsize=threads + 1)
        self.error: BaseException | None = None
        self.threads = [
            threading.Thread(target=self._run, args=(writer,), name=f"refine-store-writer-{i}", daemon=True)
            for i, writer in enumerate(self.writers)
        ]
        for thread in self.threads:
            thread.start()

    def _run(self, writer: SegmentWriter) -> None:
        while (job := self.queue.get()) is not None:
            if self.error is None:
                keys, embedding, early, original_sizes, resized_sizes, ready = job
                try:
                    if ready is not None:
                        ready.synchronize()  # the device-to-host copies of this batch have landed
                    writer.write_batch(keys, embedding.numpy(), early.numpy(), original_sizes, resized_sizes)
                except BaseException as error:  # handed to the main thread
                    self.error = error
            self.queue.task_done()

    def put(self, *job: object) -> None:
        self._raise_if_failed()
        self.queue.put(job)

    def flush(self) -> None:
        """Wait until every batch handed over so far is committed."""
        self.queue.join()
        self._raise_if_failed()

    def new_segment(self) -> None:
        """Commit what was handed over, then start fresh segments (named later than every existing one)."""
        self.flush()
        for writer in self.writers:
            writer.new_segment()

    def close(self) -> None:
        for _ in self.threads:
            self.queue.put(None)
        for thread in self.threads:
            thread.join()
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self.error is None:
            return
        error = self.error
        detail = str(error) if isinstance(error, RefineError) else f"{type(error).__name__}: {error}"
        raise RefineError(
            f"{self.writers[0].namespace.store.url}: writing features stopped ({detail}); every batch committed "
            "before is intact: fix the cause (e.g. free disk space), then run `refine extract` again to continue"
        )


class _Encoder:
    """Runs the encoder on a batch and starts the float16 features' trip to the host without waiting for it.

    On CUDA the inputs come from pinned memory and the outputs go to pinned memory behind an event that
    the writer thread waits on, so the GPU is already on the next batch while this one travels. The
    encoder's own time comes from CUDA events (CPU time would only count kernel launches).
    With `fixed_batch` every call gets exactly that many images (padded with empty ones): a compiled
    encoder then never recompiles for a short batch.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device, fixed_batch: int | None) -> None:
        self.model = model
        self.device = device
        self.fixed_batch = fixed_batch
        self.use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        self.cpu_seconds = 0.0
        self.cuda_events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def __call__(
        self, pixels: torch.Tensor, resized: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.cuda.Event | None]:
        """pixels: B x 3 x 1024 x 1024 uint8, resized: B x 2 -> host float16 B x 256 x 64 x 64, B x C x 64 x 64,
        and the event after which they hold their values (None: they already do)."""
        count = len(pixels)
        if self.fixed_batch is not None and count < self.fixed_batch:
            pixels = torch.cat([pixels, pixels.new_zeros(self.fixed_batch - count, *pixels.shape[1:])])
            resized = torch.cat([resized, resized.new_ones(self.fixed_batch - count, 2)])
        on_cuda = self.device.type == "cuda"
        started = time.perf_counter()
        if on_cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16):
            outputs = self.model(pixels.to(self.device, non_blocking=True), resized.to(self.device, non_blocking=True))
        if not on_cuda:
            self.cpu_seconds += time.perf_counter() - started
            embedding, early = (t[:count].to(torch.float16) for t in outputs)
            return embedding, early, None
        end.record()
        self.cuda_events.append((begin, end))
        host = []
        for output in outputs:
            output = output[:count].to(torch.float16)
            copy = torch.empty(output.shape, dtype=torch.float16, pin_memory=True)
            host.append(copy.copy_(output, non_blocking=True))
        ready = torch.cuda.Event()
        ready.record()
        return host[0], host[1], ready

    def seconds(self) -> float:
        """Time the encoder has run so far (on CUDA: waits for the device)."""
        if self.cuda_events:
            self.cuda_events[-1][1].synchronize()
        return self.cpu_seconds + sum(begin.elapsed_time(end) for begin, end in self.cuda_events) / 1000


def run_extract(config: ExtractConfig, progress: Progress | None = None) -> ExtractSummary:
    """Bring every image of the dataset into the store and write the dataset manifest."""
    started = time.perf_counter()
    dataset_name, items = list_images(config)
    identity = identity_for(config.encoder, config.checkpoint, config.seed)
    store = FeatureStore(config.store, create=True)
    namespace = store.ensure_namespace(identity.provenance())
    summary = ExtractSummary(dataset_name, identity.fingerprint, identity.describe_weights(), identity.random_init)
    summary.images = len(items)
    main = distributed.is_main()
    bytes_before = store.bytes_on_disk(identity.fingerprint) if main else 0
    distributed.barrier()  # under torchrun: no rank writes before the main rank has measured the store
    committed, damaged_commits = namespace.scan()
    summary.repaired.extend(damaged_commits)  # their entries are unknown, so they are misses: recomputed

    device = resolve_device(config.device)
    batch_size = config.batch_size or default_batch_size(identity.model_type, device, config.fused_attention)
    # Decoding and resizing cost a core several ms per image: a fast encoder on a GPU needs several workers.
    cores = (os.cpu_count() or 2) // distributed.local_world_size()  # the ranks on one machine share its cores
    workers = config.workers if config.workers is not None else min(8, max(1, cores - 1))
    run = _Run(config, identity, namespace, committed, summary, device, batch_size, progress)
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
    manifest = _manifest(dataset_name, identity, items, sizes)
    namespace.write_dataset(manifest)
    if config.manifest_out is not None:
        write_json(config.manifest_out, manifest, sort_keys=True, what="the manifest")
    return summary


def _merge_ranks(summary: ExtractSummary, namespace: Namespace, sizes: dict[str, Sizes]) -> None:
    """Under torchrun, once every rank has committed its share: add up the ranks' counters and failures and
    learn the sizes of the entries the other ranks computed, so that every rank knows the whole dataset's
    outcome (and exits accordingly) and the main rank can write a complete manifest."""
    parts = distributed.all_gather(
        (summary.hits, summary.computed, summary.encoder_s, summary.failed, summary.repaired)
    )
    computed_here = summary.computed
    summary.hits = sum(part[0] for part in parts)
    summary.computed = sum(part[1] for part in parts)
    summary.encoder_s = sum(part[2] for part in parts)
    # A file that cannot be read fails on every rank (all hash it); list it once.
    summary.failed = list(dict.fromkeys(message for part in parts for message in part[3]))
    summary.repaired = list(dict.fromkeys(message for part in parts for message in part[4]))
    if summary.computed > computed_here:
        for key, entry in namespace.scan()[0].items():
            sizes.setdefault(key, (entry.original_size, entry.resized_size))


def _build(identity: EncoderIdentity, config: ExtractConfig, device: torch.device, batch_size: int) -> _Encoder:
    model: torch.nn.Module = FeatureEncoder(
        build_encoder(identity, config.checkpoint, config.seed, fused_attention=config.fused_attention)
    ).to(device)
    if config.compile:
        model = torch.compile(model, dynamic=False)
    return _Encoder(model, device, batch_size if config.compile else None)


def _computed_with(config: ExtractConfig, device: torch.device, encoder: _Encoder) -> dict:
    """Recorded in each segment's commit: how its features were computed (not what they mean)."""
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "autocast": "bf16" if encoder.use_bf16 else "off",
        "fused_attention": config.fused_attention,
        "compiled": config.compile,
    }


def _check_entry(namespace: Namespace, entry: Entry) -> str | None:
    """None if a committed entry reads back and matches its digest, else what is wrong with it."""
    try:
        namespace.read(entry, check=True)
    except RefineError as error:
        return str(error)
    return None


class _Run:
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
        progress: Progress | None,
    ) -> None:
        self.config = config
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
        self.encoder: _Encoder | None = None  # built on the first miss: a warm re-run never builds it
        self.writer: _BackgroundWriter | None = None
        # Reads decompress and hash outside the GIL: two threads keep up with the hashing workers.
        self.checker = (
            ThreadPoolExecutor(max_workers=2, thread_name_prefix="refine-check") if config.check_hits else None
        )
        self.checks: dict[str, Future[str | None]] = {}

    def encode_misses(self, items: list[ImageItem], workers: int, phase: str) -> None:
        """Hash every item; check hits in the background; encode and commit the misses."""
        loader = DataLoader(
            _ImageDataset(items, frozenset(self.committed), self.share),
            batch_size=self.batch_size,
            num_workers=workers,
            collate_fn=_collate,
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

    def _encode(self, chosen: list[_Sample], pixels: torch.Tensor) -> None:
        if self.encoder is None:
            build_started = time.perf_counter()
            self.encoder = _build(self.identity, self.config, self.device, self.batch_size)
            self.summary.build_s = time.perf_counter() - build_started
            computed_with = _computed_with(self.config, self.device, self.encoder)
            self.writer = _BackgroundWriter(
                lambda: self.namespace.writer(self.identity.early_channels, self.batch_size, computed_with),
                writer_threads(self.device),
            )
        embedding, early, ready = self.encoder(pixels, torch.tensor([s.resized for s in chosen]))
        assert self.writer is not None
        originals, resized_sizes = [s.original for s in chosen], [s.resized for s in chosen]
        self.writer.put([s.key for s in chosen], embedding, early, originals, resized_sizes, ready)
        self.summary.computed += len(chosen)

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


def _manifest(name: str, identity: EncoderIdentity, items: list[ImageItem], sizes: dict[str, Sizes]) -> dict:
    """The dataset's manifest: content-determined (no times), sorted by image id."""
    images = [
        {
            "id": item.id,
            "file_name": item.file_name,
            "key": item.key,
            "original_size": list(sizes[item.key][0]),
            "resized_size": list(sizes[item.key][1]),
        }
        for item in sorted(items, key=lambda i: i.id)
        if item.key in sizes
    ]
    return {
        "format": MANIFEST_FORMAT,
        "version": 1,
        "dataset": name,
        "fingerprint": identity.fingerprint,
        "encoder": identity.model_type,
        "weights": identity.weights,
        "early_channels": identity.early_channels,
        "images": images,
        "skipped": sorted(item.file_name for item in items if item.key not in sizes),
    }
