"""The store's index at scale, by simulation: time and peak memory to open a namespace of N entries and
resolve a dataset of N images, the way `apply` and `train` do.

    python bench/store_index.py [--entries 1000000] [--load-split] [--out FILE]

Writes commit files (full segments of SEGMENT_ROWS rows, layout 2), the compacted index (as `extract`
does at its end) and one dataset manifest for N entries in the store's real format, with no arrays and
no encoder; image sizes are drawn from a few hundred distinct sizes, as in a real dataset. Then, each in
a fresh process (so that its peak memory is its own): open the store and the namespace (`open_s`), scan
the commits into the index and join the manifest to it with `apply`'s `image_entries` (`resolve_s`), and
report the process's resident memory before and after (what the index holds) and its peak
(`rss_before_mib` is the imports, torch's ~700 MiB among them). Measured with the compacted index
(`with_index`), without it (`without_index`: every commit file parsed, as for a store whose index is
stale or was never written), and with `--load-split` also train's join, `load_split`, against a COCO
file of the N images with one box each (`load_split`).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson

from pipeline.inference.apply import image_entries
from pipeline.splits import load_split
from pipeline.manifest import ManifestImage, dataset_manifest
from pipeline.store.layouts import CURRENT_LAYOUT
from pipeline.store import FeatureStore, Namespace
from pipeline.store.writer import SEGMENT_ROWS
from pipeline.store.index import INDEX_FILE

from results_file import peak_rss_mib, write_and_show  # bench/, next to this script

FINGERPRINT = "0123456789abcdef"
SHARD_ROWS = 64  # extract's CUDA batch: where a dataset of a million images is extracted
CHANNELS = 1280  # vit_h


def generate(store_path: Path, entries: int, seed: int, coco: bool) -> None:
    rng = np.random.default_rng(seed)
    store = FeatureStore(store_path, create=True)
    namespace = Namespace.ensure(store, {"fingerprint": FINGERPRINT, "model_type": "vit_h", "early_channels": CHANNELS})
    sizes = rng.integers(200, 4000, size=(300, 2))  # a few hundred distinct (height, width)
    picks = rng.integers(0, len(sizes), size=entries)
    keys = [f"{value:032x}" for value in rng.integers(0, 2**63, size=entries, dtype=np.int64).tolist()]
    embedding_bytes, early_bytes = 2 * 256 * 64 * 64, 2 * CHANNELS * 64 * 64
    images = []
    for first in range(0, entries, SEGMENT_ROWS):
        segment = f"{first:020d}-{first % 65536:08x}"
        rows = []
        for row, index in enumerate(range(first, min(first + SEGMENT_ROWS, entries))):
            height, width = (int(v) for v in sizes[picks[index]])
            scale = 1024 / max(height, width)
            resized = [round(height * scale), round(width * scale)]
            shard_row = row % SHARD_ROWS
            rows.append(
                [
                    keys[index],
                    row,
                    height,
                    width,
                    *resized,
                    f"{index:032x}",
                    shard_row * embedding_bytes,
                    shard_row * early_bytes,
                ]
            )
            images.append(
                {
                    "id": index + 1,
                    "file_name": f"images/{index // 1000:04d}/{index:08d}.jpg",
                    "key": keys[index],
                    "original_size": [height, width],
                    "resized_size": resized,
                }
            )
        commit = {
            "segment": segment,
            "layout": CURRENT_LAYOUT,
            "shard_rows": SHARD_ROWS,
            "early_channels": CHANNELS,
            "computed_with": {},
            "entries": rows,
        }
        store.write_json_atomic(f"{FINGERPRINT}/commits/{segment}.json", commit)
    namespace.write_index()
    manifest = dataset_manifest(
        "train",
        fingerprint=FINGERPRINT,
        encoder="vit_h",
        weights="random-init:seed=0",
        early_channels=CHANNELS,
        images=[
            ManifestImage(
                image["id"],
                image["file_name"],
                image["key"],
                (tuple(image["original_size"]), tuple(image["resized_size"])),
            )
            for image in images
        ],
        skipped=[],
    )
    namespace.write_manifest(manifest)
    if not coco:
        return
    annotations = {
        "images": [
            {"id": image["id"], "file_name": image["file_name"], "height": size[0], "width": size[1]}
            for image in images
            for size in [image["original_size"]]
        ],
        "annotations": [
            {"id": image["id"], "image_id": image["id"], "category_id": 1, "bbox": [1.0, 1.0, 10.0, 10.0]}
            for image in images
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }
    (store_path.parent / "train.json").write_bytes(orjson.dumps(annotations))


def resolve(store_path: str, join: str) -> dict[str, float | int | str]:
    """What `apply` (join "image_entries") or `train` (join "load_split") does before its first read: open,
    scan, join. Runs in a fresh process."""
    before = rss_mib()
    started = time.perf_counter()
    store = FeatureStore(store_path)
    namespace = Namespace(store, store.fingerprints()[0])
    opened = time.perf_counter()
    if join == "load_split":
        found = load_split(namespace, "train", Path(store_path).parent / "train.json").images
    else:
        found = image_entries(namespace, "train")
    resolved = time.perf_counter()
    return {
        "images_resolved": len(found),
        "index": namespace.index_status,
        "open_s": round(opened - started, 3),
        "resolve_s": round(resolved - opened, 3),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "rss_before_mib": round(before, 1),
        "rss_after_mib": round(rss_mib(), 1),
    }


def rss_mib() -> float:
    """The process's resident memory now (Linux)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "store_index.json")
    parser.add_argument("--load-split", action="store_true", help="also time train's join (a COCO file of N images)")
    parser.add_argument("--resolve", nargs=2, metavar=("STORE", "JOIN"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.resolve:
        print(json.dumps(resolve(*args.resolve)))
        return
    with tempfile.TemporaryDirectory(prefix="store-index-") as scratch:
        store = Path(scratch) / "features.zarr"
        started = time.perf_counter()
        generate(store, args.entries, args.seed, args.load_split)
        generate_s = time.perf_counter() - started
        commits = sorted((store / FINGERPRINT / "commits").glob("*.json"))
        manifest = store / FINGERPRINT / "datasets" / "train.json"
        index = store / FINGERPRINT / INDEX_FILE
        index_bytes = index.stat().st_size

        def measure(join: str) -> dict:
            run = subprocess.run(
                [sys.executable, __file__, "--resolve", str(store), join], capture_output=True, text=True, check=True
            )
            return json.loads(run.stdout.strip().splitlines()[-1])

        measured = {"with_index": measure("image_entries")}
        if args.load_split:
            measured["load_split"] = measure("load_split")
        index.unlink()  # as for a store written before the index existed, or an index gone stale
        measured["without_index"] = measure("image_entries")
        result = {
            "entries": args.entries,
            **measured,
            "index_mib": round(index_bytes / 2**20, 1),
            "commit_files": len(commits),
            "commit_mib": round(sum(p.stat().st_size for p in commits) / 2**20, 1),
            "manifest_mib": round(manifest.stat().st_size / 2**20, 1),
            "generate_s": round(generate_s, 1),
        }
    write_and_show(args.out.parent, args.out.stem, result)


if __name__ == "__main__":
    main()
