"""Stores at fsspec URLs: a real S3 server (moto, on loopback) reached through AWS_ENDPOINT_URL, and memory://."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Iterator

import boto3
import numpy as np
import pytest
from moto.server import ThreadedMotoServer

from conftest import write_coco, write_images
from pipeline.store import FeatureStore, Namespace
from pipeline.store.writer import SegmentWriter
from pipeline.store.gc import collect_garbage
from pipeline.store.report import verify_store
from pipeline.model.checkpoints import Checkpoint

REPO = Path(__file__).resolve().parents[1]
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server on a free loopback port, for the whole session."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket; only the standard AWS_* variables point the store at the server."""
    for name, value in {**CREDENTIALS, "AWS_ENDPOINT_URL": s3_endpoint}.items():
        monkeypatch.setenv(name, value)
    bucket = f"refine-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    return bucket


def test_s3_workflow_extract_verify_train_evaluate_apply(s3_bucket: str, cli, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # anything written locally by mistake would land here
    files = write_images(tmp_path / "images", 2)
    annotations = write_coco(tmp_path / "train.json", tmp_path / "images", files)
    store = f"s3://{s3_bucket}/features.zarr"

    extracted = cli(
        "extract", "--images", tmp_path / "images", "--annotations", annotations, "--store", store, "--workers", 0
    )
    assert extracted.exit_code == 0, extracted.output
    info = json.loads(cli("store", "info", store, "--json").stdout)
    assert info["namespaces"][0]["entries"] == 2 and info["namespaces"][0]["datasets"] == ["train"]
    assert info["bytes"] > 2 * 2**20  # features of two images, counted on the server
    verified = cli("store", "verify", store)
    assert verified.exit_code == 0 and "2 entries verified" in verified.stdout

    # train in its own process with a DataLoader worker: the worker opens the store itself, and the
    # environment alone says where S3 is.
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    trained = subprocess.run(
        [
            sys.executable,
            "-m",
            "stages.cli",
            "train",
            "--store",
            store,
            "--annotations",
            annotations,
            "--out",
            "refiner",
            "--epochs",
            "1",
            "--workers",
            "1",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert trained.returncode == 0, trained.stderr
    assert Checkpoint.load(tmp_path / "refiner" / "model.pt").epoch == 1

    evaluated = cli(
        "evaluate", "--store", store, "--annotations", annotations, "--model", "refiner/model.pt", "--out", "eval"
    )
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["count"] == 2
    applied = cli(
        "apply", "--store", store, "--boxes", annotations, "--model", "refiner/model.pt", "--out", "refined.json"
    )
    assert applied.exit_code == 0, applied.output
    assert len(json.loads((tmp_path / "refined.json").read_text())["annotations"]) == 2
    snapped = cli("apply", "--method", "snap", "--store", store, "--boxes", annotations, "--out", "snapped.json")
    assert snapped.exit_code == 0, snapped.output
    assert all("refine" in a for a in json.loads((tmp_path / "snapped.json").read_text())["annotations"])

    again = cli(
        "extract", "--images", tmp_path / "images", "--annotations", annotations, "--store", store, "--workers", 0
    )
    assert again.exit_code == 0 and "2 hits, 0 computed" in again.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "eval",
        "images",
        "refined.json",
        "refiner",
        "snapped.json",
        "train.json",
    ]


def test_s3_store_sees_other_writers_and_creates_exclusively(s3_bucket: str) -> None:
    store = FeatureStore(f"s3://{s3_bucket}/features.zarr", create=True)
    assert store.list_names("") == ["zarr.json"]  # listed once: a cached listing would now go stale
    boto3.client("s3").put_object(Bucket=s3_bucket, Key="features.zarr/other.json", Body=b"{}")  # another machine
    assert store.list_names("") == ["other.json", "zarr.json"]
    assert store.write_json_atomic("once.json", {"writer": 1}, exclusive=True)
    assert not store.write_json_atomic("once.json", {"writer": 2}, exclusive=True)  # If-None-Match: first wins
    assert store.read_json("once.json") == {"writer": 1}


def test_s3_gc_removes_an_orphan_segment(s3_bucket: str, cli) -> None:
    store = FeatureStore(f"s3://{s3_bucket}/features.zarr", create=True)
    namespace = Namespace.ensure(store, {"fingerprint": "f00d", "model_type": "vit_tiny", "early_channels": 2})
    writer = SegmentWriter(namespace, early_channels=2, shard_rows=1, planes=False)
    embedding, early = np.ones((1, 256, 64, 64), np.float16), np.ones((1, 2, 64, 64), np.float16)
    writer.write_batch(["ab"], embedding, early, [(10, 10)], [(1024, 1024)])
    orphan = f"{s3_bucket}/features.zarr/f00d/segments/0-dead/embedding/c/0/0/0/0"
    store.fs.pipe_file(orphan, b"bytes of a writer that died before committing")

    report = collect_garbage(store, grace_s=0)
    assert report.segments_removed == 1 and not store.fs.exists(orphan)
    assert verify_store(store) == (1, [])  # the committed entry is untouched
    assert cli("store", "gc", f"s3://{s3_bucket}/features.zarr", "--grace", 0).exit_code == 0


def test_missing_remote_store_is_one_line_error(s3_bucket: str, cli) -> None:
    result = cli("store", "info", f"s3://{s3_bucket}/nothing.zarr")
    assert result.exit_code == 1
    assert "no feature store here" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_memory_store_gc_knows_object_ages() -> None:
    store = FeatureStore(f"memory://refine-{uuid.uuid4().hex[:8]}/features.zarr", create=True)
    namespace = Namespace.ensure(store, {"fingerprint": "f00d", "model_type": "vit_tiny", "early_channels": 2})
    SegmentWriter(namespace, early_channels=2, shard_rows=1, planes=False).write_batch(
        ["ab"], np.ones((1, 256, 64, 64), np.float16), np.ones((1, 2, 64, 64), np.float16), [(10, 10)], [(1024, 1024)]
    )
    store.fs.pipe_file(store.path("f00d/segments/0-dead/embedding/zarr.json"), b"{}")
    assert collect_garbage(store, grace_s=3600).segments_removed == 0  # young: a writer may still be at work
    assert collect_garbage(store, grace_s=0).segments_removed == 1
    assert verify_store(store) == (1, [])


def test_new_store_beside_another_creators_temporary(tmp_path: Path) -> None:
    (tmp_path / "features.zarr").mkdir()
    (tmp_path / "features.zarr" / "zarr.json.0a1b2c.partial").write_bytes(b"{")  # a creator mid-write
    FeatureStore(tmp_path / "features.zarr", create=True)  # not "a foreign folder"
    assert FeatureStore(tmp_path / "features.zarr").fingerprints() == []
