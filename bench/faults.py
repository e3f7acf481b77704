"""Fault injection at a scale the unit tests do not reach; writes the figures of bench/reliability.md.

    python bench/faults.py [--images 40] [--kills 20] [--out bench/results]

Everything runs the real `refine` CLI in subprocesses (vit_tiny, random weights, CPU, batch size 1):
  kills       SIGKILL `extract` at random moments, resume, repeat; then gc and compare with a fresh store
  writers     2 and 4 `extract` processes at once on overlapping image sets, then gc
  train       SIGKILL `train` at random moments, `--resume`; final metrics against an uninterrupted run
  damage      truncate a shard, delete one, corrupt a commit file / a dataset manifest: verify, extract, train
  disk_full   `extract` into a small tmpfs (user namespace) until the disk is full, then with space again
Writes `<out>/reliability.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline.model.train_metrics import METRICS_FILE, TrainMetrics
from pipeline.store import FeatureStore, Namespace
from pipeline.store.report import verify_store

REPO = Path(__file__).resolve().parents[1]


def refine(*args: object) -> list[str]:
    return [sys.executable, "-m", "stages.cli", *map(str, args)]


def run(*args: object, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(refine(*args), cwd=REPO, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise SystemExit(f"refine {' '.join(map(str, args))} failed:\n{result.stderr}")
    return result


def make_dataset(root: Path, count: int, seed: int = 0) -> tuple[Path, list[Path]]:
    """`count` 64 x 64 noise images (each unique) and a COCO file with one box each."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(count):
        path = root / "images" / f"img{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
        files.append(path)
    return write_coco(root / "all.json", files), files


def write_coco(path: Path, files: list[Path]) -> Path:
    images = [{"id": int(f.stem[3:]) + 1, "file_name": f.name, "width": 64, "height": 64} for f in files]
    annotations = [
        {"id": image["id"] * 10, "image_id": image["id"], "category_id": 1, "bbox": [12 + image["id"] % 9, 10, 30, 36]}
        for image in images
    ]
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "x"}]}))
    return path


def extract_args(root: Path, annotations: Path, store: Path) -> list[object]:
    return [
        "extract",
        "--images",
        root / "images",
        "--annotations",
        annotations,
        "--store",
        store,
        "--batch-size",
        "1",
        "--workers",
        "0",
    ]


def rows_by_key(store: Path) -> Counter:
    """How many committed rows each key has, over every commit file of the store."""
    counts: Counter = Counter()
    for commit in store.glob("*/commits/*.json"):
        counts.update(row[0] for row in json.loads(commit.read_text())["entries"])
    return counts


def digests(store: Path) -> dict[str, str]:
    opened = FeatureStore(store)
    (fingerprint,) = opened.fingerprints()
    return {key: entry.digest for key, entry in Namespace.open(opened, fingerprint).entries().items()}


def orphans(store: Path) -> list[str]:
    """Files no commit references: segments without a commit, shards without a committed row, temporaries."""
    found = [p.relative_to(store).as_posix() for p in store.rglob("*.partial")]
    for namespace in (p for p in store.iterdir() if p.is_dir()):
        for segment in (p for p in (namespace / "segments").glob("*") if p.is_dir()):
            commit = namespace / "commits" / f"{segment.name}.json"
            if not commit.exists():
                found.append(segment.relative_to(store).as_posix())
                continue
            data = json.loads(commit.read_text())
            used = {row[1] // data["shard_rows"] for row in data["entries"]}
            for shard in segment.glob("*/c/*"):
                if int(shard.name) not in used:
                    found.append(shard.relative_to(store).as_posix())
    return found


def problems(store: Path) -> list[str]:
    return verify_store(FeatureStore(store))[1]


# -- faults ----------------------------------------------------------------------------------------------
def kills(root: Path, annotations: Path, count: int, want_kills: int, rng: random.Random) -> dict[str, Any]:
    """Kill `extract` again and again: one kill in five lands blind (often in start-up), the others at a
    random moment of the encode / write / commit cycle, after the run's first commit."""
    store = root / "killed.zarr"
    command = refine(*extract_args(root, annotations, store))
    history: list[dict[str, Any]] = []
    per_image = 2.0  # seconds between two commits, measured as the run goes
    while True:
        before = sum(rows_by_key(store).values()) if store.exists() else 0
        process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if len(history) >= want_kills:
            assert process.wait() == 0, "the final, uninterrupted resume failed"
            break
        started = time.monotonic()
        blind = rng.random() < 0.2
        if not blind:  # wait for this run's first commit: start-up is over, an image is in flight
            while process.poll() is None and (sum(rows_by_key(store).values()) if store.exists() else 0) == before:
                time.sleep(0.05)
            first_commit = time.monotonic()
        delay = rng.uniform(0.5, 6.0) if blind else rng.uniform(0.0, per_image)
        try:
            process.wait(timeout=delay)
            break  # finished before the kill: the run is complete
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)
            process.wait()
        after = sum(rows_by_key(store).values()) if store.exists() else 0
        if not blind and after - before > 1:
            per_image = (time.monotonic() - first_commit) / (after - before - 1)
        found = problems(store) if store.exists() else []
        history.append(
            {
                "blind": blind,
                "killed_after_s": round(time.monotonic() - started, 2),
                "committed_before": before,
                "committed_after": after,
                "verify_problems": len(found),
            }
        )
        assert not found, found
    orphans_before_gc = orphans(store)
    gc = run("store", "gc", store, "--grace", "0").stdout.strip()
    counts = rows_by_key(store)
    fresh = root / "fresh.zarr"
    run(*extract_args(root, annotations, fresh))
    expected, got = digests(fresh), digests(store)
    mismatched = sorted(k for k in expected if got.get(k) != expected[k])
    figures = {
        "images": count,
        "kills": len(history),
        "kills_with_progress": sum(h["committed_after"] > h["committed_before"] for h in history),
        "committed_keys": len(counts),
        "keys_with_more_than_one_row": sum(c > 1 for c in counts.values()),
        "entries_lost": len(set(expected) - set(got)),
        "entries_differing_from_fresh_recompute": len(mismatched),
        "verify_problems_after_any_kill": sum(h["verify_problems"] for h in history),
        "verify_problems_at_end": len(problems(store)),
        "orphans_before_gc": len(orphans_before_gc),
        "orphans_after_gc": len(orphans(store)),
        "gc": gc,
        "history": history,
    }
    assert figures["entries_lost"] == 0 and not mismatched and figures["keys_with_more_than_one_row"] == 0
    assert figures["orphans_after_gc"] == 0 and figures["verify_problems_at_end"] == 0
    return figures


def writers(root: Path, files: list[Path], processes: int, fresh: dict[str, str]) -> dict[str, Any]:
    """`processes` extracts at once; writer i takes 4 images starting at 2 i (mod n): each image twice."""
    count = 2 * processes
    store = root / f"writers{processes}.zarr"
    FeatureStore(store, create=True)
    sets = [[files[(2 * i + j) % count] for j in range(4)] for i in range(processes)]
    started = time.perf_counter()
    running = [
        subprocess.Popen(
            refine(*extract_args(root, write_coco(root / f"w{processes}_{i}.json", chosen), store)),
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i, chosen in enumerate(sets)
    ]
    failures = [p.communicate()[1] for p in running if p.wait() != 0]
    wall = time.perf_counter() - started
    before = rows_by_key(store)
    gc = run("store", "gc", store, "--grace", "0").stdout.strip()
    after = rows_by_key(store)
    got = digests(store)
    wanted = {content_key(f) for f in files[:count]}
    figures = {
        "writers": processes,
        "images": count,
        "image_sets_overlap": "every image in two writers' sets",
        "failed_writers": len(failures),
        "wall_s": round(wall, 1),
        "rows_committed": sum(before.values()),
        "keys_committed_twice_before_gc": sum(c > 1 for c in before.values()),
        "keys_with_more_than_one_row_after_gc": sum(c > 1 for c in after.values()),
        "entries_lost": len(wanted - set(got)),
        "entries_differing_from_fresh_recompute": sum(got[k] != fresh[k] for k in got),
        "verify_problems": len(problems(store)),
        "orphans_after_gc": len(orphans(store)),
        "gc": gc,
    }
    assert not failures, failures
    assert figures["entries_lost"] == 0 and figures["keys_with_more_than_one_row_after_gc"] == 0
    assert figures["entries_differing_from_fresh_recompute"] == 0 and figures["verify_problems"] == 0
    return figures


def content_key(path: Path) -> str:
    from pipeline.images import content_key as key

    return key(path.read_bytes())


def train_kills(root: Path, store: Path, annotations: Path, want_kills: int, rng: random.Random) -> dict[str, Any]:
    """Kill `train` at a random moment of an epoch after each new checkpoint, `--resume`, repeat; the final
    metrics must equal those of an uninterrupted run."""
    epochs = 6
    common = [
        "train",
        "--store",
        store,
        "--annotations",
        annotations,
        "--dataset",
        "all",
        "--epochs",
        str(epochs),
        "--batch-size",
        "4",
        "--jitters",
        "2",
        "--seed",
        "3",
    ]
    started = time.perf_counter()
    run(*common, "--out", root / "train-reference")
    reference_s = time.perf_counter() - started
    reference = TrainMetrics.read(root / "train-reference" / METRICS_FILE)
    out = root / "train-killed"
    checkpoint = out / "model.pt"
    history = []
    while True:
        resume = ["--resume"] if checkpoint.exists() else []
        stamp = checkpoint.stat().st_mtime_ns if checkpoint.exists() else None
        process = subprocess.Popen(
            refine(*common, "--out", out, *resume),
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        if len(history) >= want_kills:
            assert process.wait() == 0, process.communicate()[1]
            break
        # Wait for this run's first new checkpoint, then kill somewhere inside the next epoch.
        while process.poll() is None and (checkpoint.stat().st_mtime_ns if checkpoint.exists() else None) == stamp:
            time.sleep(0.05)
        delay = rng.uniform(0.0, reference_s / epochs)
        try:
            process.wait(timeout=delay)
            if process.returncode != 0:
                raise SystemExit(process.communicate()[1])
            break  # finished before the kill
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)
            process.wait()
        import torch

        history.append(
            {
                "killed_after_checkpoint_s": round(delay, 2),
                "checkpoint_epoch": torch.load(checkpoint, weights_only=True)["epoch"],
            }
        )
    final = TrainMetrics.read(out / METRICS_FILE)
    figures = {
        "epochs": epochs,
        "kills": len(history),
        "uninterrupted_s": round(reference_s, 1),
        "final_metrics_equal": final == reference,
        "reference": reference.to_json(),
        "resumed": final.to_json(),
        "history": history,
    }
    assert final == reference, (final, reference)
    return figures


def damage(root: Path, clean: Path, annotations: Path, fresh: dict[str, str]) -> list[dict[str, Any]]:
    """Each kind of damage on a copy of a good store: what verify, train and extract make of it."""

    def shard(store: Path) -> Path:
        return sorted(store.glob("*/segments/*/early/c/*/0/0/0"))[0]

    kinds = {
        "truncate a shard": lambda s: shard(s).write_bytes(shard(s).read_bytes()[:1000]),
        "delete a shard": lambda s: shard(s).unlink(),
        "corrupt a commit file": lambda s: sorted(s.glob("*/commits/*.json"))[0].write_text('{"entries": [["x"'),
        "corrupt the dataset manifest": lambda s: next(s.glob("*/datasets/all.json")).write_text("{ nope"),
    }
    results = []
    for name, hurt in kinds.items():
        store = root / f"damaged-{len(results)}.zarr"
        shutil.copytree(clean, store)
        hurt(store)
        verify = run("store", "verify", store, check=False)
        train = run(
            "train",
            "--store",
            store,
            "--annotations",
            annotations,
            "--dataset",
            "all",
            "--epochs",
            "1",
            "--out",
            root / f"damaged-train-{len(results)}",
            check=False,
        )
        extract = run(*extract_args(root, annotations, store), check=False)
        after = run("store", "verify", store, check=False)
        run("store", "gc", store, "--grace", "0", check=False)
        got = digests(store) if after.returncode == 0 else {}
        results.append(
            {
                "damage": name,
                "verify_exit": verify.returncode,
                "verify_names": _last_error(verify.stderr, first=True),
                "train_exit": train.returncode,
                "train_error": _last_error(train.stderr),
                "extract_exit": extract.returncode,
                "extract_recomputed": extract.stdout.split("computed")[0].split(",")[-1].strip() + " computed",
                "extract_reported": next(
                    (line.strip() for line in extract.stderr.splitlines() if "damaged, recomputed" in line), ""
                )[:300],
                "verify_after_extract_exit": after.returncode,
                "entries_equal_fresh_after_extract": got == fresh,
            }
        )
    return results


def _last_error(stderr: str, first: bool = False) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip() and not line.startswith("WARNING")]
    return (
        lines[0] if first else next((line for line in lines if line.startswith("error:")), lines[-1] if lines else "")
    )[:300]


def disk_full(root: Path, annotations: Path) -> dict[str, Any]:
    """extract into a 6 MiB tmpfs (two of the five entries fit), then remount it with room and resume."""
    mount = root / "tmpfs"
    mount.mkdir()
    store = mount / "store.zarr"
    small = write_coco(root / "five.json", sorted((root / "images").glob("*.png"))[:5])
    extract = " ".join(map(_quote, refine(*extract_args(root, small, store))))
    verify = " ".join(map(_quote, refine("store", "verify", store)))
    script = (
        f"mount -t tmpfs -o size=6m tmpfs {_quote(mount)} || exit 99\n"
        f"{extract} > {root}/full.out 2> {root}/full.err; echo extract_full=$?\n"
        f"{verify} > {root}/verify.out 2>&1; echo verify_full=$?\n"
        f"find {_quote(store)} -name '*.partial' | wc -l | sed 's/^/partials=/'\n"
        f"mount -o remount,size=64m {_quote(mount)}\n"
        f"{extract} > {root}/resume.out 2>&1; echo extract_resumed=$?\n"
        f"{verify} >> {root}/verify.out 2>&1; echo verify_resumed=$?\n"
    )
    result = subprocess.run(["unshare", "-Urm", "sh", "-c", script], cwd=REPO, capture_output=True, text=True)
    if "extract_full" not in result.stdout:
        return {"skipped": f"no tmpfs in a user namespace here ({result.stderr.strip()[:200]})"}
    codes = dict(line.split("=") for line in result.stdout.split() if "=" in line)
    return {
        "filesystem": "tmpfs, 6 MiB (user namespace), later remounted at 64 MiB",
        "extract_exit_when_full": int(codes["extract_full"]),
        "message": _last_error((root / "full.err").read_text()),
        "verify_exit_when_full": int(codes["verify_full"]),
        "committed_when_full": (root / "verify.out").read_text().split(" entries verified")[0].split()[-1],
        "temporary_files_left": int(codes["partials"]),
        "extract_exit_resumed": int(codes["extract_resumed"]),
        "resumed_summary": (root / "resume.out").read_text().split("dataset ")[-1].split(" s wall")[0],
        "verify_exit_resumed": int(codes["verify_resumed"]),
    }


def _quote(value: object) -> str:
    return "'" + str(value).replace("'", "'\\''") + "'"


STAGES = ("kills", "writers", "train", "damage", "disk_full")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=40, help="images of the kill run (default 40)")
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs of extract (default 20)")
    parser.add_argument("--train-kills", type=int, default=5, help="SIGKILLs of train (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments (default 0)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="folder for reliability.json")
    parser.add_argument("--work", type=Path, default=None, help="keep the data here (default: a temporary folder)")
    parser.add_argument(
        "--stages",
        default=",".join(STAGES),
        help="comma-separated subset; later stages reuse the kill run's stores in --work (default: all)",
    )
    args = parser.parse_args()
    rng = random.Random(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    target = args.out / "reliability.json"
    report: dict[str, Any] = json.loads(target.read_text()) if target.exists() else {}
    report.update({"cpu_count": os.cpu_count(), "encoder": "vit_tiny, random init, CPU, batch size 1"})
    with tempfile.TemporaryDirectory() as scratch:
        root = args.work or Path(scratch)
        root.mkdir(parents=True, exist_ok=True)
        if (root / "all.json").exists():
            annotations, files = root / "all.json", sorted((root / "images").glob("*.png"))
        else:
            annotations, files = make_dataset(root, args.images)
        for stage in args.stages.split(","):
            started = time.perf_counter()
            if stage == "kills":
                report[stage] = kills(root, annotations, len(files), args.kills, rng)
            elif stage == "writers":
                report[stage] = [writers(root, files, n, digests(root / "fresh.zarr")) for n in (2, 4)]
            elif stage == "train":
                report[stage] = train_kills(root, root / "fresh.zarr", annotations, args.train_kills, rng)
            elif stage == "damage":
                report[stage] = damage(root, root / "killed.zarr", annotations, digests(root / "fresh.zarr"))
            elif stage == "disk_full":
                report[stage] = disk_full(root, annotations)
            else:
                raise SystemExit(f"unknown stage {stage!r}; choose from {', '.join(STAGES)}")
            report.setdefault("stage_wall_s", {})[stage] = round(time.perf_counter() - started, 1)
            # After each stage (a crash keeps the rest); this machine's paths never go into the figures.
            target.write_text(json.dumps(report, indent=1).replace(str(root), "<work>") + "\n")
            print(stage, json.dumps(report[stage])[:2000], flush=True)
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
