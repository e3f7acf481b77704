"""`extract`: encode every image of a dataset once into the feature store; a warm re-run only hashes.

The pipeline, each part overlapped with the encoder:
  hash files (thread pool)  ->  keys already committed are hits, the rest are misses
  DataLoader workers decode, orient, resize the misses  ->  encoder (batched, bf16 on CUDA)
  ->  a writer thread commits each batch to this process's own store segment (bounded queue).
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pipeline.coco import load_coco
from pipeline.encoder import EncoderIdentity, FeatureEncoder, build_encoder, identity_for
from pipeline.errors import RefineError
from pipeline.images import IMAGE_SUFFIXES, content_key, prepare
from pipeline.store import FeatureStore, Namespace

MANIFEST_FORMAT = "refine-dataset-manifest"
# Images per encoder call (and per store shard) when --batch-size is not given.
DEFAULT_BATCH = {"cpu": 4, "cuda": {"vit_tiny": 64, "vit_b": 32, "vit_l": 16, "vit_h": 8}}


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
    wall_s: float = 0.0
    encoder_s: float = 0.0
    data_wait_s: float = 0.0
    bytes_written: int = 0


@dataclass
class ImageItem:
    """One image of the dataset: its id and name in the annotations, its file, and (once hashed) its key."""

    id: int
    file_name: str
    path: Path
    key: str = ""


@dataclass(frozen=True)
class _Sizes:
    original_size: tuple[int, int]
    resized_size: tuple[int, int]


Progress = Callable[[str, int, int, ExtractSummary], None]  # (phase, done, total, counters so far)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RefineError("--device cuda was asked for, but no CUDA device is available")
    if device not in ("cpu", "cuda"):
        raise RefineError(f"unknown device {device!r}; choose auto, cuda or cpu")
    return torch.device(device)


def list_images(config: ExtractConfig) -> tuple[str, list[ImageItem]]:
    """The dataset's name and images; with annotations exactly the images they list, each checked to exist."""
    if not config.images.is_dir():
        raise RefineError(f"{config.images}: image directory not found")
    if config.annotations is not None:
        coco = load_coco(config.annotations)
        items = [ImageItem(im.id, im.file_name, config.images / im.file_name) for im in coco.images]
        for item in items:
            if not item.path.is_file():
                raise RefineError(f"{config.annotations}: image id={item.id}: file {item.file_name!r} not found under the image directory")
        return config.dataset or config.annotations.stem, items
    files = sorted(
        p for p in config.images.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
    )
    items = [ImageItem(i, p.relative_to(config.images).as_posix(), p) for i, p in enumerate(files)]
    return config.dataset or config.images.name, items


class _MissDataset(Dataset):
    """Decodes the images to encode; a file that fails is returned as its error message, never raised,
    so one bad image does not stop the batch."""

    def __init__(self, items: list[ImageItem]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[int, np.ndarray | None, tuple, tuple, str | None]:
        try:
            pixels, original, resized = prepare(self.items[index].path)
            return index, pixels, original, resized, None
        except RefineError as error:
            return index, None, (), (), f"{error} [image id={self.items[index].id}]"


def _collate(samples: list) -> dict:
    """Stack in numpy: workers must not run torch kernels (OpenMP after fork can hang)."""
    good = [s for s in samples if s[4] is None]
    pixels = np.stack([s[1] for s in good]) if good else np.zeros((0, 3, 1, 1), np.uint8)
    return {
        "indices": [s[0] for s in good],
        "pixels": torch.from_numpy(pixels),
        "original": [s[2] for s in good],
        "resized": torch.tensor([s[3] for s in good], dtype=torch.int64).reshape(-1, 2),
        "failures": [(s[0], s[4]) for s in samples if s[4] is not None],
    }


def _hash_all(items: list[ImageItem], summary: ExtractSummary, progress: Progress | None) -> None:
    def hash_one(item: ImageItem) -> None:
        item.key = content_key(item.path)

    # hashlib releases the GIL on large buffers, so threads hash in parallel with file reads.
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:
        for done, _ in enumerate(pool.map(hash_one, items), start=1):
            if progress and (done % 64 == 0 or done == len(items)):
                progress("hash", done, len(items), summary)


def run_extract(config: ExtractConfig, progress: Progress | None = None) -> ExtractSummary:
    started = time.perf_counter()
    dataset_name, items = list_images(config)
    identity = identity_for(config.encoder, config.checkpoint, config.seed)
    store = FeatureStore(config.store, create=True)
    namespace = store.ensure_namespace(identity.provenance())
    summary = ExtractSummary(dataset_name, identity.fingerprint, identity.describe_weights(), identity.random_init)
    summary.images = len(items)
    bytes_before = store.bytes_on_disk(identity.fingerprint)

    _hash_all(items, summary, progress)
    committed = namespace.entries()
    first_of_key: dict[str, ImageItem] = {}
    for item in items:
        first_of_key.setdefault(item.key, item)
    summary.unique = len(first_of_key)
    misses = [item for key, item in first_of_key.items() if key not in committed]
    summary.hits = summary.unique - len(misses)
    if misses:
        sizes = _encode_misses(config, identity, namespace, misses, summary, progress)
        committed = {**committed, **sizes}
    elif progress:
        progress("encode", 0, 0, summary)

    summary.bytes_written = store.bytes_on_disk(identity.fingerprint) - bytes_before
    summary.wall_s = time.perf_counter() - started
    if summary.failed and not config.skip_bad_images:
        return summary  # the caller reports the failures; no manifest for an incomplete dataset
    failed_keys = {item.key for item in items if item.key not in committed}
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": 1,
        "dataset": dataset_name,
        "fingerprint": identity.fingerprint,
        "encoder": identity.model_type,
        "weights": identity.weights,
        "early_channels": identity.early_channels,
        "images": [
            {
                "id": item.id,
                "file_name": item.file_name,
                "key": item.key,
                "original_size": list(committed[item.key].original_size),
                "resized_size": list(committed[item.key].resized_size),
            }
            for item in sorted(items, key=lambda i: i.id)
            if item.key not in failed_keys
        ],
        "skipped": sorted(item.file_name for item in items if item.key in failed_keys),
    }
    namespace.write_dataset(manifest)
    if config.manifest_out is not None:
        _write_manifest_copy(config.manifest_out, manifest)
    return summary


def _write_manifest_copy(path: Path, manifest: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.partial")
        temporary.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        temporary.replace(path)
    except OSError as error:
        raise RefineError(f"{path}: cannot write the manifest ({error.strerror or error})") from None


def _encode_misses(
    config: ExtractConfig,
    identity: EncoderIdentity,
    namespace: Namespace,
    misses: list[ImageItem],
    summary: ExtractSummary,
    progress: Progress | None,
) -> dict[str, _Sizes]:
    """Encode `misses` and commit them; returns the new entries' sizes by key."""
    device = resolve_device(config.device)
    batch_size = config.batch_size or (
        DEFAULT_BATCH["cpu"] if device.type == "cpu" else DEFAULT_BATCH["cuda"][identity.model_type]
    )
    workers = config.workers if config.workers is not None else min(4, max(1, (os.cpu_count() or 2) - 1))
    model = FeatureEncoder(build_encoder(identity, config.checkpoint, config.seed)).to(device)
    use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    loader = DataLoader(
        _MissDataset(misses),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if workers else None,
    )
    writer = namespace.writer(identity.early_channels, batch_size)
    pending: queue.Queue = queue.Queue(maxsize=2)  # bounded: the encoder never runs far ahead of the disk
    writer_error: list[BaseException] = []
    written: dict[str, _Sizes] = {}

    def write_loop() -> None:
        while (job := pending.get()) is not None:
            if writer_error:
                continue  # drain so the producer never blocks after a failure
            try:
                writer.write_batch(*job)
                for key, original, resized in zip(job[0], job[3], job[4]):
                    written[key] = _Sizes(original, resized)
            except BaseException as error:  # re-raised in the main thread
                writer_error.append(error)

    thread = threading.Thread(target=write_loop, name="refine-store-writer", daemon=True)
    thread.start()
    done = 0
    try:
        wait_started = time.perf_counter()
        for batch in loader:
            summary.data_wait_s += time.perf_counter() - wait_started
            for index, message in batch["failures"]:
                summary.failed.append(message)
            if batch["indices"]:
                encode_started = time.perf_counter()
                with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                    embedding, early = model(
                        batch["pixels"].to(device, non_blocking=True), batch["resized"].to(device)
                    )
                embedding = embedding.to(torch.float16).cpu().numpy()
                early = early.to(torch.float16).cpu().numpy()
                summary.encoder_s += time.perf_counter() - encode_started
                keys = [misses[i].key for i in batch["indices"]]
                pending.put((keys, embedding, early, batch["original"], [tuple(r) for r in batch["resized"].tolist()]))
                summary.computed += len(keys)
            if writer_error:
                break
            done += len(batch["indices"]) + len(batch["failures"])
            if progress:
                progress("encode", done, len(misses), summary)
            wait_started = time.perf_counter()
    finally:
        pending.put(None)
        thread.join()
    if writer_error:
        error = writer_error[0]
        if isinstance(error, RefineError):
            raise error
        raise RefineError(f"{namespace.store.url}: writing features failed ({type(error).__name__}: {error})") from error
    return written
