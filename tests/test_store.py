"""The store's promises: info and verify, damage detection, SIGKILL at any moment, concurrent writers."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import zarr

from pipeline.devices import autocast, resolve_encoder_amp
from pipeline.manifest import manifest_images
from pipeline.hqsam.encoder import FeatureEncoder, build_encoder, identity_for
from pipeline.images import content_key, prepare, stride4_plane
from pipeline.store import FeatureStore, Namespace
from pipeline.store.layouts import CURRENT_LAYOUT, LAYOUTS, all_finite
from tests.helpers import extract_args, orphans, rows_by_key, write_coco, write_images

REPO = Path(__file__).resolve().parents[1]


def refine(*args: object) -> list[str]:
    return [sys.executable, "-m", "stages.cli", *map(str, args)]


def committed_rows(store: Path) -> int:
    rows = 0
    for commit in store.glob("*/commits/*.json"):
        try:
            rows += len(json.loads(commit.read_text())["entries"])
        except (json.JSONDecodeError, FileNotFoundError):
            pass  # atomic replace means this cannot happen; verify below would catch it
    return rows


def fresh_digests(files: list[Path]) -> dict[str, str]:
    """Key -> digest of each image's features computed afresh, one image at a time and in extract's default
    precision, as extract does here."""
    encoder = FeatureEncoder(build_encoder(identity_for("vit_tiny", None), None))
    cpu = torch.device("cpu")
    digests = {}
    for path in files:
        pixels, _, resized = prepare(path)
        with torch.inference_mode(), autocast(cpu, resolve_encoder_amp("auto", cpu)):
            embedding, early = encoder(torch.from_numpy(pixels)[None], torch.tensor([resized]))
        digests[content_key(path.read_bytes())] = LAYOUTS[CURRENT_LAYOUT].digest(
            embedding[0].to(torch.float16).numpy(), early[0].to(torch.float16).numpy(), stride4_plane(pixels[None])[0]
        )
    return digests


def stored_digests(store: Path) -> dict[str, str]:
    opened = FeatureStore(store)
    (fingerprint,) = opened.fingerprints()
    return {key: entry.digest for key, entry in Namespace.open(opened, fingerprint).entries().items()}


def test_info_json_lists_namespaces_with_entries_and_datasets(cli, base_dataset):
    result = cli("store", "info", base_dataset["store"], "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    (namespace,) = report["namespaces"]
    assert namespace["encoder"] == "vit_tiny" and namespace["entries"] == 4
    assert namespace["datasets"] == ["train"] and len(namespace["fingerprint"]) == 16
    assert namespace["random_init"] is True and "RANDOM" in namespace["weights"]
    assert namespace["provenance"]["versions"]["torch"]
    text = cli("store", "info", base_dataset["store"])
    assert text.exit_code == 0 and "4 entries" in text.stdout


def test_verify_passes_on_a_good_store(cli, base_dataset):
    result = cli("store", "verify", base_dataset["store"])
    assert result.exit_code == 0 and "4 entries verified" in result.stdout


def test_verify_names_damaged_entries(cli, dataset):
    (shard,) = [p for p in dataset["store"].rglob("*") if p.is_file() and "/early/c/" in p.as_posix()]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    result = cli("store", "verify", dataset["store"])
    assert result.exit_code == 1
    assert "4 problem(s)" in result.stderr and "cannot be read" in result.stderr


def test_verify_detects_silently_changed_bytes(cli, dataset):
    """A flipped byte that still decodes is caught by the per-entry digest."""
    store = FeatureStore(dataset["store"])
    namespace = Namespace.open(store, store.fingerprints()[0])
    entry = min(namespace.entries().values(), key=lambda e: e.row)
    array = zarr.open_array(
        dataset["store"] / namespace.fingerprint / "segments" / entry.segment / "embedding", mode="r+"
    )
    array[entry.row] = array[entry.row] + 1  # rewrites the shard with valid but different data
    result = cli("store", "verify", dataset["store"])
    assert result.exit_code == 1
    assert f"entry {entry.key}" in result.stderr and "digest" in result.stderr


def test_verify_reports_a_damaged_manifest(cli, dataset):
    (manifest,) = dataset["store"].glob("*/datasets/train.json")
    manifest.write_text("{ not json")
    result = cli("store", "verify", dataset["store"])
    assert result.exit_code == 1 and "train.json is damaged" in result.stderr


def test_sigkill_mid_run_then_resume_completes(tmp_path):
    files = write_images(tmp_path / "images", 5, seed=3)
    annotations = write_coco(tmp_path / "train.json", tmp_path / "images", files)
    store = tmp_path / "features.zarr"
    command = refine(*extract_args(tmp_path / "images", annotations, store))
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while committed_rows(store) < 2 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    survived = committed_rows(store)
    assert 2 <= survived < 5, "the kill should land mid-run"
    assert subprocess.run(refine("store", "verify", store), cwd=REPO, capture_output=True).returncode == 0

    resumed = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{survived} hits, {5 - survived} computed" in resumed.stdout.replace("\n", " ")
    verify = subprocess.run(refine("store", "verify", store), cwd=REPO, capture_output=True, text=True)
    assert verify.returncode == 0 and "5 entries verified" in verify.stdout
    gc = subprocess.run(refine("store", "gc", store, "--grace", "0"), cwd=REPO, capture_output=True, text=True)
    assert gc.returncode == 0, gc.stderr
    assert orphans(store) == [] and set(rows_by_key(store).values()) == {1}
    assert stored_digests(store) == fresh_digests(files)  # every entry equals a fresh recompute


def test_two_concurrent_writers_on_overlapping_images(tmp_path):
    files = write_images(tmp_path / "images", 5, seed=4)
    first = write_coco(tmp_path / "first.json", tmp_path / "images", files[:3])
    second = write_coco(tmp_path / "second.json", tmp_path / "images", files[2:])
    store = tmp_path / "features.zarr"
    FeatureStore(store, create=True)  # both writers start on an existing, empty store
    processes = [
        subprocess.Popen(
            refine(*extract_args(tmp_path / "images", annotations, store)),
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for annotations in (first, second)
    ]
    for process in processes:
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr
    opened = FeatureStore(store)
    (fingerprint,) = opened.fingerprints()
    namespace = Namespace.open(opened, fingerprint)
    segments = namespace.commit_names()
    assert len(segments) == 2  # each writer committed into its own segment
    assert len(namespace.entries()) == 5
    assert sum(rows_by_key(store).values()) in (5, 6)  # the shared image once, or twice if both encoded it at once
    gc = subprocess.run(refine("store", "gc", store, "--grace", "0"), cwd=REPO, capture_output=True, text=True)
    assert gc.returncode == 0, gc.stderr
    assert rows_by_key(store) == dict.fromkeys(stored_digests(store), 1) and orphans(store) == []
    for name, expected in (("first", files[:3]), ("second", files[2:])):
        manifest = namespace.manifest(name)
        assert manifest_images(manifest, "test").file_names == [f.name for f in expected]
    verify = subprocess.run(refine("store", "verify", store), cwd=REPO, capture_output=True, text=True)
    assert verify.returncode == 0, verify.stderr
    assert stored_digests(store) == fresh_digests(files)  # nothing lost, nothing corrupt


def test_all_finite_reads_the_float16_exponent_bits() -> None:
    finite = np.array([0.0, -0.0, 65504.0, -65504.0, 6e-8, 1.0], dtype=np.float16)  # extremes and a subnormal
    assert all_finite(finite) and all_finite(finite.astype(np.float32))
    for bad in (np.nan, np.inf, -np.inf):
        broken = finite.copy()
        broken[3] = bad
        assert not all_finite(broken)
        assert not all_finite(broken.astype(np.float32))
