"""Scale figures on one machine: 1 vs 2 extract processes (torchrun), and an S3 store against a local one.

    python bench/scale.py [--images 8] [--out bench/results]

In one run, on the same demo images (vit_tiny, random weights, CPU):
  - `extract` into a fresh local store by one process, and by `torchrun --nproc-per-node 2` (two ranks,
    one thread each, as torchrun sets OMP_NUM_THREADS=1); wall time of the whole command (imports and
    process start included) and the run's own wall time as `extract` reports it;
  - `extract` into a fresh local store and into a fresh S3 store (a moto server in its own process on
    loopback, reached through AWS_ENDPOINT_URL), both in this process;
  - reading every entry back with its digest checked (the store alone), and one training epoch
    (`refine train --epochs 1`, validation on the same images), from either store.
Writes `<out>/scale.json`. The load average is recorded: on a shared machine the ratios are the figures.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from pipeline.training.config import TrainConfig
from pipeline.demo_data import make_demo_dataset
from pipeline.extraction.config import ExtractConfig
from pipeline.extraction.extract import run_extract
from pipeline.store import FeatureStore, Namespace
from pipeline.training.train import run_train

from results_file import write_and_show  # bench/, next to this script

REPO = Path(__file__).resolve().parents[1]


def run_command(command: list[str], cwd: Path) -> dict[str, float]:
    """Run an `extract` command; its wall time end to end and the run's own wall time from its summary."""
    started = time.perf_counter()
    done = subprocess.run(
        command, cwd=cwd, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, check=False
    )
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    run_wall = float(re.search(r"([\d.]+) s wall", done.stdout).group(1))
    return {"command_s": round(wall, 2), "extract_s": round(run_wall, 2)}


def processes(images: Path, annotations: Path, work: Path) -> dict[str, Any]:
    """1 process vs 2 torchrun ranks, each into a fresh local store."""
    args = ["--images", str(images), "--annotations", str(annotations), "--workers", "1"]
    one = run_command([sys.executable, "-m", "stages.cli", "extract", *args, "--store", str(work / "one.zarr")], work)
    two = run_command(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "stages.cli",
            "extract",
            *args,
            "--store",
            str(work / "two.zarr"),
        ],
        work,
    )
    return {
        "one_process": one,
        "two_processes": two,
        "speedup_extract": round(one["extract_s"] / two["extract_s"], 3),
        "speedup_command": round(one["command_s"] / two["command_s"], 3),
    }


def start_moto() -> tuple[subprocess.Popen, str]:
    """A moto S3 server in its own process (so it does not share this process's GIL) on a free port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            return server, endpoint
        except OSError:
            time.sleep(0.2)
    server.kill()
    raise SystemExit("the moto server did not start")


def stores(images: Path, annotations: Path, work: Path, endpoint: str) -> dict[str, Any]:
    """Extract and one training epoch, local store vs S3 store, in this process."""
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
    )
    results: dict[str, Any] = {}
    for name, store in (("local", str(work / "local.zarr")), ("s3", "s3://bench/features.zarr")):
        summary = run_extract(ExtractConfig(images, store, annotations=annotations, workers=1))
        namespace = Namespace.open(FeatureStore(store), summary.fingerprint)
        started = time.perf_counter()
        for entry in namespace.entries().values():
            namespace.read(entry, check=True)
        read_s = time.perf_counter() - started
        trained = run_train(TrainConfig(store=store, annotations=annotations, out=work / f"refiner-{name}", epochs=1))
        results[name] = {
            "extract_s": round(summary.wall_s, 2),
            "encoder_s": round(summary.encoder_s, 2),
            "store_mib": round(summary.bytes_written / 2**20, 1),
            "read_all_s": round(read_s, 3),
            "read_mib_per_s": round(summary.bytes_written / 2**20 / read_s, 1),
            "train_epoch_s": round(trained.wall_s, 2),
        }
    for key in ("extract_s", "read_all_s", "train_epoch_s"):
        results[f"s3_overhead_{key}"] = round(results["s3"][key] / results["local"][key] - 1, 3)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8, help="Demo images to extract.")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="Folder for scale.json.")
    options = parser.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        make_demo_dataset(work / "demo", seed=0, n_train=options.images, n_val=1)
        images, annotations = work / "demo" / "images", work / "demo" / "train.json"
        result: dict[str, Any] = {
            "images": options.images,
            "encoder": "vit_tiny (random weights)",
            "cpu_cores": os.cpu_count(),
        }
        result["processes"] = processes(images, annotations, work)
        server, endpoint = start_moto()
        try:
            result["stores"] = stores(images, annotations, work, endpoint)
        finally:
            server.kill()
    result["load_average_before_after"] = [round(load_before[0], 2), round(os.getloadavg()[0], 2)]
    write_and_show(options.out, "scale", result)


if __name__ == "__main__":
    main()
