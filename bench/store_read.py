"""Store reads against the disk, in one run: the read path `train` uses, raw reads of the same shard files,
one `.npy` per image and feature, and the older layout's read path.

    python bench/store_read.py [--encoder vit_h] [--entries 48] [--rounds 3] [--out FILE]

Synthetic entries of the encoder's shapes (embedding 256 x 64 x 64 and early C x 64 x 64, float16) are
written through the store's own `SegmentWriter` (no encoder), and the same arrays as a layout-1 store (as
refine wrote them before layouts) and as `.npy` files. The raw anchor reads the same bytes as the store,
entry by entry in the same order, with `open().read()` (`raw_shard_files`: the whole shard files instead).
Each method then reads every entry once, in one seeded random order, `--rounds` times, rounds
interleaved so that the machine's noise hits all methods alike; the JSON gives the median round. Hot: the
page cache holds the files (one untimed pass first). Cold: every file's pages are evicted with
posix_fadvise(DONTNEED) before each round. Readers 1 / 2 / 4 are `train`'s DataLoader (`feature_loader`)
with 0 / 2 / 4 worker processes, batches of 4, hot cache.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from pipeline.hqsam.encoder import ENCODERS
from pipeline.splits import ImageBoxes
from pipeline.training.data import FeatureDataset, feature_loader
from pipeline.store import FeatureStore, Namespace
from pipeline.store.layouts import EARLY, EMBEDDING
from pipeline.store.shards import shard_file
from pipeline.store.legacy import mark_version_1, write_legacy_segment
from pipeline.store.writer import SegmentWriter

from results_file import write_and_show  # bench/, next to this script


SHARD_ROWS = 4  # extract's CPU batch: one shard file per 4 entries and array
SIZES = ([480, 640], [768, 1024])  # original and resized (height, width) of every synthetic entry


def synthetic(entries: int, channels: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Float16 features with the spread of real ones (what zstd sees decides the older layout's bytes)."""
    rng = np.random.default_rng(seed)
    embedding = rng.standard_normal((entries, 256, 64, 64), dtype=np.float32).astype(np.float16)
    early = (rng.standard_normal((entries, channels, 64, 64), dtype=np.float32) * 0.003).astype(np.float16)
    return embedding, early


def write_stores(root: Path, embedding: np.ndarray, early: np.ndarray) -> dict[str, float]:
    """The current store, the layout-1 store and the .npy files; returns the write seconds of the two stores."""
    keys = [f"{i:032x}" for i in range(len(embedding))]
    seconds = {}
    for name in ("current", "legacy"):
        store = FeatureStore(root / f"{name}.zarr", create=True)
        namespace = Namespace.ensure(store, {"fingerprint": "bench", "early_channels": early.shape[1]})
        started = time.perf_counter()
        if name == "current":
            writer = SegmentWriter(namespace, early.shape[1], SHARD_ROWS, planes=False)
            for start in range(0, len(keys), SHARD_ROWS):
                rows = slice(start, start + SHARD_ROWS)
                count = len(keys[rows])
                writer.write_batch(keys[rows], embedding[rows], early[rows], [SIZES[0]] * count, [SIZES[1]] * count)
        else:
            for start in range(0, len(keys), SHARD_ROWS):
                rows = slice(start, start + SHARD_ROWS)
                count = len(keys[rows])
                write_legacy_segment(
                    store, "bench", f"{start:020d}-legacy00", keys[rows], embedding[rows], early[rows], [SIZES] * count
                )
            mark_version_1(store)
        seconds[name] = time.perf_counter() - started
    (root / "npy").mkdir()
    for i in range(len(keys)):
        np.save(root / "npy" / f"{i}_embedding.npy", embedding[i])
        np.save(root / "npy" / f"{i}_early.npy", early[i])
    return seconds


def dataset_of(store: Path) -> FeatureDataset:
    """`train`'s dataset over every entry of a bench store (boxes are not read on this path)."""
    namespace = Namespace(FeatureStore(store), "bench")
    images = [
        ImageBoxes(i, f"{i}.jpg", entry, torch.zeros(1, 4), None, None)
        for i, entry in enumerate(sorted(namespace.entries().values(), key=lambda e: e.key))
    ]
    return FeatureDataset(str(store), "bench", images)


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def evict(paths: list[Path]) -> None:
    for path in paths:
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)  # dirty pages cannot be dropped
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(descriptor)


def read_items(dataset: FeatureDataset, order: list[int]) -> Callable[[], int]:
    def run() -> int:
        total = 0
        for index in order:
            item = dataset[index]
            if "error" in item:
                raise SystemExit(item["error"])
            total += item["embedding"].nbytes + item["early"].nbytes
        return total

    return run


def read_raw(dataset: FeatureDataset, order: list[int]) -> Callable[[], int]:
    """The same bytes as the store read, in the same order, with plain `open().read()`: each entry's two
    chunks from their shard files, nothing checked."""
    namespace = dataset.namespace()
    ranges = []
    for index in order:
        entry = dataset.images[index].entry
        shard = entry.row // entry.shard_rows
        for name, channels, offset in (
            (EMBEDDING, 256, entry.offsets[0]),
            (EARLY, entry.early_channels, entry.offsets[1]),
        ):
            path = namespace.store.path(shard_file(namespace.fingerprint, entry.segment, name, shard))
            ranges.append((path, offset, 2 * channels * 64 * 64))

    def run() -> int:
        total = 0
        for path, offset, nbytes in ranges:
            with open(path, "rb") as f:
                f.seek(offset)
                total += len(f.read(nbytes))
        return total

    return run


def read_files(paths: list[Path]) -> Callable[[], int]:
    def run() -> int:
        total = 0
        for path in paths:
            with open(path, "rb") as f:
                total += len(f.read())
        return total

    return run


def read_npy(folder: Path, order: list[int]) -> Callable[[], int]:
    def run() -> int:
        total = 0
        for index in order:
            total += np.load(folder / f"{index}_embedding.npy").nbytes + np.load(folder / f"{index}_early.npy").nbytes
        return total

    return run


def read_loader(dataset: FeatureDataset, workers: int, seed: int) -> Callable[[], int]:
    sampler = torch.utils.data.RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))
    loader = feature_loader(dataset, SHARD_ROWS, workers, sampler)

    def run() -> int:
        total = 0
        for batch in loader:
            if batch.errors:
                raise SystemExit(batch.errors[0])
            total += batch.embedding.nbytes + batch.early.nbytes
        return total

    return run


def measure(methods: dict[str, Callable[[], int]], rounds: int, before_round: Callable[[], None] | None) -> dict:
    """MiB/s of each method: the median of `rounds` interleaved rounds."""
    rates: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(rounds):
        for name, run in methods.items():
            if before_round is not None:
                before_round()
            started = time.perf_counter()
            nbytes = run()
            rates[name].append(nbytes / 2**20 / (time.perf_counter() - started))
    return {name: round(statistics.median(values), 1) for name, values in rates.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoder", choices=sorted(ENCODERS), default="vit_h")
    parser.add_argument("--entries", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="Default: bench/results/store_read_<encoder>.json")
    args = parser.parse_args()
    out = args.out or Path(__file__).parent / "results" / f"store_read_{args.encoder}.json"
    channels = ENCODERS[args.encoder].early_channels
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    warnings.filterwarnings("ignore", message="This DataLoader will create")  # 4 readers on 2 cores, on purpose

    with tempfile.TemporaryDirectory(prefix="store-read-") as scratch:
        root = Path(scratch)
        embedding, early = synthetic(args.entries, channels, args.seed)
        entry_mib = (embedding[0].nbytes + early[0].nbytes) / 2**20
        write_s = write_stores(root, embedding, early)
        del embedding, early
        order = np.random.default_rng(args.seed).permutation(args.entries).tolist()
        current, legacy = dataset_of(root / "current.zarr"), dataset_of(root / "legacy.zarr")
        shards = [p for p in files_under(root / "current.zarr") if "/c/" in p.as_posix()]
        single = {
            "store": read_items(current, order),
            "raw": read_raw(current, order),
            "raw_shard_files": read_files(shards),
            "npy": read_npy(root / "npy", order),
            "legacy_store": read_items(legacy, order),
        }
        for run in single.values():
            run()  # warm the page cache (and the datasets' opened stores)
        hot = measure(single, args.rounds, None)
        everything = files_under(root)
        cold = measure(single, args.rounds, lambda: evict(everything))
        readers = {f"{n}": read_loader(current, workers, args.seed) for n, workers in ((1, 0), (2, 2), (4, 4))}
        for run in readers.values():
            run()  # start the workers, warm the cache
        loader = measure(readers, args.rounds, None)

        result = {
            "encoder": args.encoder,
            "entries": args.entries,
            "early_channels": channels,
            "mib_per_entry": round(entry_mib, 2),
            "rounds": args.rounds,
            "cpu_threads": torch.get_num_threads(),
            "store_read_mib_s": hot["store"],
            "raw_read_mib_s": hot["raw"],
            "npy_read_mib_s": hot["npy"],
            "legacy_store_read_mib_s": hot["legacy_store"],
            "raw_shard_files_mib_s": hot["raw_shard_files"],
            "store_entries_s": round(hot["store"] / entry_mib, 1),
            "store_vs_raw": round(hot["store"] / hot["raw"], 2),
            "store_vs_npy": round(hot["store"] / hot["npy"], 2),
            "store_vs_legacy": round(hot["store"] / hot["legacy_store"], 1),
            "cold": {
                "store_read_mib_s": cold["store"],
                "raw_read_mib_s": cold["raw"],
                "npy_read_mib_s": cold["npy"],
                "legacy_store_read_mib_s": cold["legacy_store"],
                "raw_shard_files_mib_s": cold["raw_shard_files"],
                "store_vs_raw": round(cold["store"] / cold["raw"], 2),
                "store_vs_npy": round(cold["store"] / cold["npy"], 2),
            },
            "train_loader_mib_s_by_readers": loader,
            "write_s": {name: round(value, 2) for name, value in write_s.items()},
            "write_vs_legacy": round(write_s["legacy"] / write_s["current"], 2),
            "bytes_on_disk_per_entry_mib": {
                name: round(sum(p.stat().st_size for p in files_under(root / f"{name}.zarr")) / args.entries / 2**20, 2)
                for name in ("current", "legacy")
            },
            "load_average": os.getloadavg()[0],
        }
    write_and_show(out.parent, out.stem, result)


if __name__ == "__main__":
    main()
