"""`refine store gc`: remove what no commit references, and every copy of a key but the one readers use.

What goes, per namespace:
  - a segment without a commit file: its writer died before its first batch was committed;
  - shard files of a committed segment that no committed row lives in: the batch in flight when its
    writer died;
  - rows of a key that a later segment also holds (readers resolve a key to its latest copy, see
    `pipeline.store`): the commit file is rewritten without them, a segment left with no row goes whole;
  - temporary files (`*.partial`) of a write that was killed.

Then it writes each namespace's compacted index (`pipeline.store.index`) of the commit files that are left.

Safe next to a running `extract`: only segments and temporaries with no write for `grace_s` seconds are
touched. A writer writes its segment after every batch, and one that has been idle for SEGMENT_IDLE_S
(well below the default grace) moves to a fresh segment instead, so gc never changes a segment that a
writer may still append to. Crash-safe itself: a commit file is rewritten (atomically) before the bytes
it stops naming are deleted, so a killed gc leaves at most more garbage, never a dangling row. A damaged
commit file is reported and its segment left alone (gc does not delete what it cannot read) unless
`drop_damaged`: then both go, and `extract` recomputes whatever a dataset needed from them. Run one gc at
a time; a `train` reading the store while gc removes copies it resolved earlier stops with a clear error.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pipeline.errors import RefineError
from pipeline.store import Entry, FeatureStore, Namespace
from pipeline.store.commit import commit_path
from pipeline.store.writer import SEGMENT_IDLE_S

# Six times SEGMENT_IDLE_S: the margin covers a batch being written while the clocks run.
DEFAULT_GRACE_S = 6 * SEGMENT_IDLE_S


@dataclass
class GcReport:
    """What gc removed (or, in a dry run, would remove) and what it left alone."""

    segments_removed: int = 0
    shards_removed: int = 0  # shard files (one per array per batch)
    duplicates_removed: int = 0
    temporaries_removed: int = 0
    bytes_freed: int = 0
    live_segments: int = 0  # written within the grace period: untouched
    left_alone: list[str] = field(default_factory=list)  # damaged commit files kept, one message each
    damaged_removed: list[str] = field(default_factory=list)  # damaged commit files removed (drop_damaged)


def _mtime(info: dict[str, Any], now: float) -> float:
    """A file's modification time from an fsspec listing; unknown counts as now (never deleted)."""
    # Local files: mtime; S3: LastModified; GCS / Azure: last_modified; memory: created (objects are immutable)
    value = next(
        (info[k] for k in ("mtime", "LastModified", "last_modified", "created") if info.get(k) is not None), None
    )
    if isinstance(value, datetime):
        return value.timestamp()
    return float(value) if value is not None else now


class _Collector:
    def __init__(self, store: FeatureStore, grace_s: float, dry_run: bool, drop_damaged: bool) -> None:
        self.store = store
        self.dry_run = dry_run
        self.drop_damaged = drop_damaged
        self.now = time.time()
        self.cutoff = self.now - grace_s
        self.report = GcReport()
        self.files = {
            path[len(store.root) + 1 :]: info for path, info in store.fs.find(store.root, detail=True).items()
        }

    def remove(self, relative: str) -> None:
        """Delete a file or a folder (recursively), counting the bytes."""
        prefix = relative + "/"
        gone = [name for name in self.files if name == relative or name.startswith(prefix)]
        self.report.bytes_freed += sum(int(self.files.pop(name).get("size") or 0) for name in gone)
        if not self.dry_run:
            self.store.fs.rm(self.store.path(relative), recursive=True)

    def temporaries(self) -> None:
        for name, info in list(self.files.items()):
            if name.endswith(".partial") and _mtime(info, self.now) < self.cutoff:
                self.remove(name)
                self.report.temporaries_removed += 1

    def namespace(self, namespace: Namespace) -> None:
        fingerprint = namespace.fingerprint
        commits: dict[str, list[Entry]] = {}
        damaged: dict[str, str] = {}
        for segment in namespace.commit_names():
            try:
                commits[segment] = namespace.commit_entries(segment)
            except RefineError as error:
                damaged[segment] = str(error)
            except FileNotFoundError:
                continue
        winners = {entry.key: entry for segment in sorted(commits) for entry in commits[segment]}
        segment_files: dict[str, dict[str, dict]] = {}
        for name, info in self.files.items():
            parts = name.split("/")
            if len(parts) > 3 and parts[0] == fingerprint and parts[1] == "segments":  # a file inside a segment
                segment_files.setdefault(parts[2], {})[name] = info
        for segment in sorted(set(segment_files) | set(commits) | set(damaged)):
            commit_file = commit_path(fingerprint, segment)
            touched = [_mtime(info, self.now) for info in segment_files.get(segment, {}).values()]
            if commit_file in self.files:
                touched.append(_mtime(self.files[commit_file], self.now))
            if segment in damaged and not (self.drop_damaged and max(touched, default=self.now) < self.cutoff):
                self.report.left_alone.append(damaged[segment])
            elif max(touched, default=self.now) >= self.cutoff:
                self.report.live_segments += 1
            elif segment in damaged:
                self.report.damaged_removed.append(damaged[segment])
                self.remove(commit_file)
                self.remove(f"{fingerprint}/segments/{segment}")
                self.report.segments_removed += 1
            else:
                self.segment(namespace, segment, commits.get(segment), winners, segment_files.get(segment, {}))

    def segment(
        self,
        namespace: Namespace,
        segment: str,
        entries: list[Entry] | None,
        winners: dict[str, Entry],
        files: dict[str, dict],
    ) -> None:
        fingerprint = namespace.fingerprint
        commit_file = commit_path(fingerprint, segment)
        kept = [entry for entry in entries or [] if winners[entry.key] == entry]
        self.report.duplicates_removed += len(entries or []) - len(kept)
        if not kept:
            if entries is not None:
                self.remove(commit_file)  # first the commit: no reader may see rows whose bytes are going
            self.remove(f"{fingerprint}/segments/{segment}")
            self.report.segments_removed += 1
            return
        commit = namespace.read_commit(segment)
        if entries is not None and len(kept) < len(entries) and not self.dry_run:
            namespace.write_commit(commit.with_entries(kept))
        used = {entry.row // commit.shard_rows for entry in kept}
        shards = set()
        for name in files:
            if name not in self.files:
                continue  # a temporary, already removed
            parts = name.split("/")  # <fingerprint>/segments/<segment>/<array>/c/<shard>/...
            if len(parts) > 5 and parts[4] == "c" and parts[5].isdigit() and int(parts[5]) not in used:
                shards.add("/".join(parts[:6]))
        for shard in sorted(shards):
            self.remove(shard)
            self.report.shards_removed += 1


def collect_garbage(
    store: FeatureStore, grace_s: float = DEFAULT_GRACE_S, dry_run: bool = False, drop_damaged: bool = False
) -> GcReport:
    """Remove unreferenced segments and shards, duplicate copies and stale temporaries (see the module)."""
    if grace_s < 0:
        raise RefineError(f"--grace must be at least 0 seconds, got {grace_s}")
    collector = _Collector(store, grace_s, dry_run, drop_damaged)
    collector.temporaries()
    for fingerprint in store.fingerprints():
        namespace = Namespace(store, fingerprint)
        collector.namespace(namespace)
        if not dry_run:
            namespace.write_index()  # after the commit files changed: readers skip parsing them
    return collector.report
