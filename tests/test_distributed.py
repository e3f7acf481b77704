"""`extract` and `train` under torchrun: real gloo process groups, two ranks on CPU, a real store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

from conftest import write_coco, write_images
from pipeline.training.config import TrainConfig
from pipeline.distributed import Share
from pipeline.extraction.config import ExtractConfig
from pipeline.extraction.extract import run_extract
from pipeline.training.sampler import EpochShuffle
from pipeline.images import content_key
from pipeline.store import FeatureStore, Namespace
from pipeline.model.checkpoints import Checkpoint
from pipeline.training.train import run_train

REPO = Path(__file__).resolve().parents[1]


def torchrun(module: str, *args: object, cwd: Path) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node 2 -m <module> <args>` with this checkout's code, as the README says
    (`-m stages.cli <command>`: the installed `refine` script may belong to another checkout)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", module]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([*command, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread, like each rank under torchrun (and faster on a loaded 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def only_namespace(store: Path | str) -> Namespace:
    opened = FeatureStore(store)
    (fingerprint,) = opened.fingerprints()
    return Namespace.open(opened, fingerprint)


def test_shares_partition_the_keys_and_the_epoch() -> None:
    keys = [content_key(bytes([i])) for i in range(50)]
    owners = [[rank for rank in range(3) if Share(rank, 3)(key)] for key in keys]
    assert all(len(found) == 1 for found in owners)  # every key has exactly one rank
    assert {found[0] for found in owners} == {0, 1, 2}
    one = list(EpochShuffle(7, seed=3))
    parts = [list(EpochShuffle(7, seed=3, rank=rank, world_size=2)) for rank in range(2)]
    assert [len(part) for part in parts] == [4, 4]  # equal steps on every rank (one image repeated)
    assert [parts[i % 2][i // 2] for i in range(7)] == one  # the one-process order, dealt out


@pytest.mark.parametrize("size", [1, 2, 5, 7, 12])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_epoch_shares_are_distributed_samplers_shares_of_the_same_permutation(size: int, world_size: int) -> None:
    """Same padding and dealing as torch's DistributedSampler; only the permutation's seeding differs."""
    for epoch in (0, 3):
        order = EpochShuffle(size, seed=5)
        order.set_epoch(epoch)
        permutation = list(order)
        for rank in range(world_size):
            ours = EpochShuffle(size, seed=5, rank=rank, world_size=world_size)
            ours.set_epoch(epoch)
            torchs = DistributedSampler(range(size), num_replicas=world_size, rank=rank, shuffle=False)
            assert list(ours) == [permutation[i] for i in torchs]
            assert len(ours) == len(torchs)


def _dataset_for_two_ranks(root: Path) -> tuple[list[Path], Path, Path]:
    """Two good images, one per rank, and an undecodable one that rank 1 owns (so its failure must travel)."""
    candidates = write_images(root / "images", 6)
    by_rank = {0: [], 1: []}
    for path in candidates:
        by_rank[int(content_key(path.read_bytes()), 16) % 2].append(path)
    good = [by_rank[0][0], by_rank[1][0]]
    bad = root / "images" / "bad.png"
    suffix = 0
    while True:  # not an image, with a key of rank 1
        bad.write_bytes(b"not an image %d" % suffix)
        if int(content_key(bad.read_bytes()), 16) % 2 == 1:
            break
        suffix += 1
    annotations = write_coco(root / "train.json", root / "images", good)
    coco = json.loads(annotations.read_text())
    coco["images"].append({"id": 99, "file_name": "bad.png", "width": 50, "height": 50})
    annotations.write_text(json.dumps(coco))
    return good, bad, annotations


def test_distributed_extract_equals_single_process(tmp_path: Path) -> None:
    good, bad, annotations = _dataset_for_two_ranks(tmp_path)
    store, manifest = tmp_path / "features.zarr", tmp_path / "train.manifest.json"
    args = ("--images", tmp_path / "images", "--annotations", annotations, "--store", store, "--manifest", manifest)

    failed = torchrun("stages.cli", "extract", *args, cwd=tmp_path)
    assert failed.returncode != 0  # rank 1's undecodable image fails the whole run
    assert "bad.png" in failed.stderr and "no dataset manifest was written" in failed.stderr
    assert not manifest.exists()
    namespace = only_namespace(store)
    assert len(namespace.commit_names()) == 2  # each rank wrote its own segment
    assert set(namespace.entries()) == {content_key(path.read_bytes()) for path in good}

    finished = torchrun("stages.cli", "extract", *args, "--skip-bad-images", cwd=tmp_path)
    assert finished.returncode == 0, finished.stderr
    assert "2 hits, 0 computed" in finished.stdout  # the re-launch only hashes what is committed
    written = json.loads(manifest.read_text())
    assert written["skipped"] == ["bad.png"]
    assert written == namespace.manifest("train")

    # One process, one thread like each rank (float sums depend on the thread count, not on the batch).
    single = tmp_path / "single.zarr"
    with one_thread():
        run_extract(
            ExtractConfig(tmp_path / "images", str(single), annotations=annotations, workers=0, skip_bad_images=True)
        )
    reference = only_namespace(single)
    assert written == reference.manifest("train")  # the same manifest, byte for byte
    entries, expected = namespace.entries(), reference.entries()
    assert entries.keys() == expected.keys()
    for key, entry in entries.items():
        assert (entry.digest, entry.original_size, entry.resized_size) == (
            expected[key].digest,
            expected[key].original_size,
            expected[key].resized_size,
        )
        for mine, theirs in zip(
            namespace.read(entry, check=True), reference.read(expected[key], check=True), strict=True
        ):
            assert np.array_equal(mine.view(np.uint16), theirs.view(np.uint16))


def test_distributed_train_checkpoints_and_resumes(dataset: dict, tmp_path: Path) -> None:
    out = tmp_path / "refiner"
    # No held-out image: of 4 images, 3 left to train on would be padded to 4 across 2 ranks, and the padded
    # steps could not match one process's. The held-out pass is gathered across ranks as validation is.
    args = ("--store", dataset["store"], "--annotations", dataset["annotations"], "--out", out, "--batch-size", 4)
    args = (*args, "--holdout", 0)
    first = torchrun("stages.cli", "train", *args, "--epochs", 1, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert Checkpoint.load(out / "model.pt").epoch == 1
    assert first.stdout.count("wrote ") == 1  # the main rank reports, once

    resumed = torchrun("stages.cli", "train", *args, "--epochs", 2, "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    checkpoint = Checkpoint.load(out / "model.pt")
    assert checkpoint.epoch == 2
    assert json.loads((out / "train_metrics.json").read_text()) == checkpoint.metrics.to_json()
    assert sorted(p.name for p in out.iterdir()) == ["live", "model.pt", "train_metrics.json"]  # no partials

    # The same seed in one process: the same steps and draws, so the same numbers up to float sums.
    with one_thread():
        alone = run_train(
            TrainConfig(
                store=str(dataset["store"]),
                annotations=dataset["annotations"],
                out=tmp_path / "alone",
                epochs=2,
                batch_size=4,
                holdout=0.0,
            )
        ).metrics
    assert alone is not None
    assert checkpoint.metrics.train_loss == pytest.approx(alone.train_loss, rel=1e-3)
    assert checkpoint.metrics.val.mean_iou_coarse == pytest.approx(alone.val.mean_iou_coarse, abs=1e-3)
    assert checkpoint.metrics.val.mean_iou_refined == pytest.approx(alone.val.mean_iou_refined, abs=1e-3)
