"""Faults, small and fast: store gc, damaged stores (verify, extract, train), a full disk, `train` killed.

The same faults at scale (20+ kills over 40 images, 4 writers) are in bench/faults.py.
"""

from __future__ import annotations

import json
import resource
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.hqsam.encoder import identity_for
from pipeline.store import FeatureStore, Namespace
from pipeline.store.gc import collect_garbage
from pipeline.store.index import INDEX_FILE
from pipeline.store.report import verify_store
from tests.helpers import (
    assert_clean_error,
    extract_args,
    features,
    orphans,
    rows_by_key,
    write,
    write_coco,
    write_images,
)

REPO = Path(__file__).resolve().parents[1]


def refine(*args: object) -> list[str]:
    return [sys.executable, "-m", "stages.cli", *map(str, args)]


@pytest.fixture
def messy_store(tmp_path: Path) -> tuple[Path, Namespace]:
    """A store with every kind of garbage a killed or racing writer leaves behind."""
    store = FeatureStore(tmp_path / "store.zarr", create=True)
    namespace = Namespace.ensure(store, identity_for("vit_tiny", None).provenance())
    commits = tmp_path / "store.zarr" / namespace.fingerprint / "commits"
    first = write(namespace, ["k1", "k2"], seed=1)
    committed = next(commits.glob("*.json")).read_text()
    embedding, early = features(2, 1)
    first.write_batch(["k3"], embedding, early, [(64, 64)], [(1024, 1024)])  # a second shard...
    next(commits.glob("*.json")).write_text(committed)  # ...whose commit never happened (killed)
    time.sleep(0.002)  # segment names are time-ordered: the next writer's copy of k2 is the latest
    write(namespace, ["k2"], seed=3)
    unfinished = write(namespace, ["k4"], seed=4)  # killed before its commit:
    (commits / f"{unfinished._segment}.json").unlink()
    (commits / "00000000000000000000-dead.json.3f2a.partial").write_text("{")  # a killed atomic write
    return tmp_path / "store.zarr", namespace


def test_gc_leaves_fresh_segments_alone_then_removes_every_orphan_and_duplicate(messy_store, cli) -> None:
    path, namespace = messy_store
    expected = {key: namespace.read(entry) for key, entry in namespace.entries().items()}
    assert rows_by_key(path) == {"k1": 1, "k2": 2}
    assert namespace.entries()["k2"].segment == max(namespace.commit_names())  # the latest copy wins
    files = sorted(p for p in path.rglob("*") if p.is_file())

    result = cli("store", "gc", path)  # default grace: everything was just written, a writer may be live
    assert result.exit_code == 0, result.output
    assert "3 segment(s) written within the grace period left alone" in result.stdout
    index_file = path / namespace.fingerprint / INDEX_FILE  # gc's only addition: the compacted index
    assert sorted(p for p in path.rglob("*") if p.is_file() and p != index_file) == files
    index_file.unlink()

    dry = collect_garbage(FeatureStore(path), grace_s=0, dry_run=True)
    assert sorted(p for p in path.rglob("*") if p.is_file()) == files
    report = collect_garbage(FeatureStore(path), grace_s=0)
    assert (report.segments_removed, report.shards_removed, report.duplicates_removed, report.temporaries_removed) == (
        1,
        2,
        1,
        1,
    )  # one orphan shard in each of the two arrays
    assert report.bytes_freed == dry.bytes_freed > 0
    assert rows_by_key(path) == {"k1": 1, "k2": 1} and orphans(path) == []
    reopened = Namespace(FeatureStore(path), namespace.fingerprint)
    for key, (embedding, early) in expected.items():
        stored = reopened.read(reopened.entries()[key], check=True)
        assert np.array_equal(stored[0], embedding) and np.array_equal(stored[1], early)
    assert reopened.index_status == "used"  # written by gc after its last change
    assert verify_store(FeatureStore(path))[1] == []


def test_gc_keeps_a_damaged_commit_unless_asked(messy_store, cli) -> None:
    path, namespace = messy_store
    damaged = path / namespace.fingerprint / "commits" / f"{min(namespace.commit_names())}.json"
    damaged.write_text('{"entries": [["k1", 0')
    result = cli("store", "gc", path, "--grace", "0")
    assert result.exit_code == 0 and "left alone" in result.stderr and damaged.name in result.stderr
    assert damaged.exists()
    result = cli("store", "gc", path, "--grace", "0", "--drop-damaged")
    assert result.exit_code == 0 and "removed (damaged)" in result.stderr
    assert not damaged.exists() and orphans(path) == [] and verify_store(FeatureStore(path))[1] == []


# -- damaged stores: verify names it, train refuses it, extract recomputes it --------------------------
def _first_shard(store: Path) -> Path:
    return sorted(store.glob("*/segments/*/early/c/*/0/0/0"))[0]


DAMAGE = {
    "truncated-shard": (lambda s: _first_shard(s).write_bytes(_first_shard(s).read_bytes()[:500]), "cannot be read"),
    "deleted-shard": (lambda s: _first_shard(s).unlink(), "its shard file is missing"),
    "corrupt-commit": (lambda s: next(s.glob("*/commits/*.json")).write_text('{"entries": [["'), "is damaged"),
    "corrupt-manifest": (lambda s: next(s.glob("*/datasets/train.json")).write_text("{ nope"), "train.json is damaged"),
}
# The repair every message about the damage names (a damaged commit file stops every read until it goes).
REPAIR = {
    "truncated-shard": "refine extract",
    "deleted-shard": "refine extract",
    "corrupt-commit": "refine store gc --drop-damaged --grace 0",
    "corrupt-manifest": "refine extract",
}


def named_repair(stderr: str) -> list[str]:
    """The arguments of the command an error names after 'repair:'."""
    command = stderr.split("repair: `", 1)[1].split("`", 1)[0]
    return shlex.split(command)[1:]


@pytest.mark.parametrize("kind", DAMAGE)
def test_damage_is_named_refused_by_train_and_recomputed_by_extract(kind, cli, dataset, tmp_path) -> None:
    store = dataset["store"]
    before = {
        key: entry.digest
        for key, entry in Namespace(FeatureStore(store), FeatureStore(store).fingerprints()[0]).entries().items()
    }
    hurt, fragment = DAMAGE[kind]
    hurt(store)

    verify = cli("store", "verify", store)
    assert_clean_error(verify, "problem(s) found")
    assert fragment in verify.stderr
    if kind in ("truncated-shard", "deleted-shard"):
        assert all(f"entry {key}" in verify.stderr for key in before)  # each damaged entry is named

    train = cli(
        "train",
        "--store",
        store,
        "--annotations",
        dataset["annotations"],
        "--out",
        tmp_path / "out",
        "--epochs",
        "1",
        "--batch-size",
        "2",
    )
    assert_clean_error(train, fragment)
    assert not (tmp_path / "out" / "model.pt").exists()  # nothing trained on garbage
    for result in (verify, train):
        assert f"repair: `{REPAIR[kind]} " in result.stderr, result.stderr

    if kind == "deleted-shard":
        return  # extract repairs it exactly as a truncated shard (the digest check); bench/faults.py runs it
    extract = cli(
        "extract",
        "--images",
        dataset["images"],
        "--annotations",
        dataset["annotations"],
        "--store",
        store,
        "--workers",
        "0",
        "--amp",
        "off",  # the precision the shared store was made in: the recomputed bytes must equal the originals
    )
    assert extract.exit_code == 0, extract.output
    recomputed = 0 if kind == "corrupt-manifest" else 4  # one shard (one commit) holds all four entries
    assert f"{4 - recomputed} hits, {recomputed} computed" in extract.stdout
    if kind == "corrupt-commit":  # extract recomputed its entries elsewhere; the named command removes it
        assert "repair: `refine store gc" in extract.stderr
        assert cli(*named_repair(train.stderr)).exit_code == 0
    assert cli("store", "verify", store).exit_code == 0
    opened = FeatureStore(store)
    after = {key: entry.digest for key, entry in Namespace.open(opened, opened.fingerprints()[0]).entries().items()}
    assert after == before  # the recomputed entries equal the originals, and they are what readers get


# -- a full disk -------------------------------------------------------------------------------------------
def _tmpfs_available() -> bool:
    probe = subprocess.run(["unshare", "-Urm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.parametrize("limit", ["tmpfs", "rlimit"])
def test_full_disk_stops_clearly_and_keeps_the_committed_part(limit, tmp_path) -> None:
    files = write_images(tmp_path / "images", 5, seed=9)
    annotations = write_coco(tmp_path / "train.json", tmp_path / "images", files)
    mount = tmp_path / "disk"
    mount.mkdir()
    store = mount / "store.zarr"
    extract = refine(*extract_args(tmp_path / "images", annotations, store))
    verify = refine("store", "verify", store)
    if limit == "tmpfs":
        if not _tmpfs_available():
            pytest.skip("no tmpfs in a user namespace on this machine")
        # 6 MiB: room for two entries (~2.5 MB each), a real ENOSPC on the third.
        quoted = " ".join(f"'{a}'" for a in extract)
        script = (
            f"mount -t tmpfs -o size=6m tmpfs '{mount}' && {quoted} 2> '{tmp_path}/err'; echo $? > '{tmp_path}/rc'; "
            f"{' '.join(repr(a) for a in verify)} > '{tmp_path}/verify' 2>&1; echo $? >> '{tmp_path}/rc'; "
            f"find '{mount}' -name '*.partial' | wc -l >> '{tmp_path}/rc'"
        )
        subprocess.run(["unshare", "-Urm", "sh", "-c", script], cwd=REPO, timeout=300)
        extract_rc, verify_rc, partials = (int(v) for v in (tmp_path / "rc").read_text().split())
        stderr, verified = (tmp_path / "err").read_text(), (tmp_path / "verify").read_text()
        assert verify_rc == 0 and partials == 0, verified
        assert 1 <= int(verified.split(" entries verified")[0].split()[-1]) < 5  # some committed, then full
        assert "No space left on device" in stderr
    else:
        # RLIMIT_FSIZE: a real kernel limit on the size of any file written (EFBIG; Python ignores SIGXFSZ).
        def limit_file_size() -> None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

        result = subprocess.run(
            extract, cwd=REPO, capture_output=True, text=True, preexec_fn=limit_file_size, timeout=300
        )
        extract_rc, stderr = result.returncode, result.stderr
        assert "File too large" in stderr
        checked = subprocess.run(verify, cwd=REPO, capture_output=True, text=True)
        assert checked.returncode == 0 and "0 entries verified" in checked.stdout
        assert list(store.rglob("*.partial")) == []
    assert extract_rc == 1
    (message,) = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert "writing features stopped" in message and "run `refine extract` again" in message
    assert "Traceback" not in stderr


# -- train killed mid-epoch --------------------------------------------------------------------------------
def test_train_killed_mid_epoch_resumes_to_the_same_metrics(dataset, tmp_path) -> None:
    common = [
        "train",
        "--store",
        dataset["store"],
        "--annotations",
        dataset["annotations"],
        "--epochs",
        "3",
        "--batch-size",
        "1",
        "--jitters",
        "2",
    ]
    reference = subprocess.run(
        refine(*common, "--out", tmp_path / "reference"), cwd=REPO, capture_output=True, text=True
    )
    assert reference.returncode == 0, reference.stderr
    out = tmp_path / "killed"
    process = subprocess.Popen(
        refine(*common, "--out", out), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 120
    while not (out / "model.pt").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)  # just after the epoch-1 checkpoint: in the middle of epoch 2
    process.wait()
    assert not (out / "train_metrics.json").exists(), "the kill should land before the run ends"
    resumed = subprocess.run(refine(*common, "--out", out, "--resume"), cwd=REPO, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "epochs 2-3" in resumed.stdout
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert metrics == json.loads((tmp_path / "reference" / "train_metrics.json").read_text())


# -- killed at the worst moments ---------------------------------------------------------------------------
# Run `refine extract` with one store function wrapped to SIGKILL the process on its n-th call: the second
# batch dies after its shards are written but before its commit, or in the middle of writing the commit.
KILL_ON_CALL = """
import os, signal, sys
import pipeline.store as store
calls = []
def deadly(real):
    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == int(sys.argv[2]):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)
    return wrapper
# Both count the same small files: root, namespace, first commit, then the second commit.
if sys.argv[1] == "after-shards":  # before the second commit starts: its batch's shards are on disk
    store.FeatureStore.write_json_atomic = deadly(store.FeatureStore.write_json_atomic)
else:  # on the fsync of the second commit's temporary (files only: each rename's folder is flushed too)
    import stat
    file_fsync = deadly(os.fsync)
    real_fsync = os.fsync
    os.fsync = lambda fd: file_fsync(fd) if stat.S_ISREG(os.fstat(fd).st_mode) else real_fsync(fd)
from stages.cli import app
app(sys.argv[3:])
"""


@pytest.mark.parametrize("moment, call", [("after-shards", 4), ("mid-commit", 4)])
def test_kill_at_the_worst_moment_leaves_only_garbage_that_gc_removes(moment, call, tmp_path) -> None:
    files = write_images(tmp_path / "images", 2, seed=11)
    annotations = write_coco(tmp_path / "train.json", tmp_path / "images", files)
    store = tmp_path / "store.zarr"
    args = extract_args(tmp_path / "images", annotations, store)
    killed = subprocess.run(
        [sys.executable, "-c", KILL_ON_CALL, moment, str(call), *map(str, args)],
        cwd=REPO,
        capture_output=True,
        timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL
    assert rows_by_key(store) and sum(rows_by_key(store).values()) == 1  # the first batch, committed
    assert orphans(store)  # the second batch's shards (and the commit's temporary) are garbage...
    assert verify_store(FeatureStore(store))[1] == []  # ...that no reader sees
    resumed = subprocess.run(refine(*args), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0 and "1 hits, 1 computed" in resumed.stdout, resumed.stderr
    assert collect_garbage(FeatureStore(store), grace_s=0).bytes_freed > 0
    assert orphans(store) == [] and set(rows_by_key(store).values()) == {1}
    assert verify_store(FeatureStore(store))[1] == []
