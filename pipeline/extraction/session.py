"""One `extract` run over a dataset's images: the keys known so far, each hit's entry read back and checked in
the background, and the misses encoded (the encoder and the writer threads built on the first miss)."""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch.utils.data import DataLoader

from pipeline import distributed
from pipeline.errors import RefineError
from pipeline.extraction.config import ExtractConfig, ExtractSummary, OnProgress
from pipeline.extraction.encoder_runner import EncoderRunner, build_runner, computed_with
from pipeline.extraction.image_files import ImageDataset, ImageItem, ImageSample, collate_images
from pipeline.extraction.writers import BackgroundWriter, writer_threads
from pipeline.hqsam.encoder import EncoderIdentity
from pipeline.images import stride4_plane
from pipeline.manifest import Sizes
from pipeline.store import Entry, Namespace
from pipeline.store.writer import SegmentWriter


def _check_entry(namespace: Namespace, entry: Entry) -> str | None:
    """None if a committed entry reads back and matches its digest, else what is wrong with it."""
    try:
        namespace.read(entry, check=True)
    except RefineError as error:
        return str(error)
    return None


class ExtractionRun:
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
        amp: torch.dtype | None,
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
        self.amp = amp
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
                self.amp,
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
