"""`refine store migrate`: rewrite entries of layout 1 (zstd chunks) into layout 2 (raw, mapped at disk speed).

Layout 3 adds each entry's stride-4 image plane, which only the images can give: `refine extract` adds it
(it recomputes the entries of older layouts that a dataset uses). Migrate needs no images.

Nothing is changed in place: every old entry is read, checked against its digest and written again into a
fresh segment of layout 2, which readers prefer (the latest copy of a key wins, see
`pipeline.store`). The old copies stay readable until `refine store gc` removes them, so a migrate that
is killed or fails half way loses nothing, and running it again continues where it stopped.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from pipeline.store import Entry, FeatureStore, Namespace
from pipeline.store.layouts import LAYOUTS
from pipeline.store.writer import SegmentWriter


@dataclass
class MigrateReport:
    entries_rewritten: int = 0
    entries_current: int = 0  # already of layout 2 or later: untouched
    bytes_read: int = 0


def migrate_store(store: FeatureStore, progress: Callable[[int, int], None] | None = None) -> MigrateReport:
    """Rewrite every entry of layout 1 into layout 2; `progress(done, total)` after each batch."""
    report = MigrateReport()
    namespaces = [Namespace(store, fingerprint) for fingerprint in store.fingerprints()]
    old: list[tuple[Namespace, list[Entry]]] = []
    for namespace in namespaces:
        entries = namespace.entries()  # a damaged commit file stops here, named, before anything is written
        stale = [entry for entry in entries.values() if not LAYOUTS[entry.layout].mapped]
        report.entries_current += len(entries) - len(stale)
        old.append((namespace, sorted(stale, key=lambda entry: (entry.segment, entry.row))))
    total = sum(len(stale) for _, stale in old)
    for namespace, stale in old:
        by_segment: dict[str, list[Entry]] = {}
        for entry in stale:
            by_segment.setdefault(entry.segment, []).append(entry)
        # One writer (and its thread pool) per way of writing, not per old segment: a store has hundreds.
        writers: dict[str, SegmentWriter] = {}
        for segment, entries in by_segment.items():
            commit = namespace.read_commit(segment)
            shard_rows = commit.shard_rows
            how = (commit.early_channels, shard_rows, commit.computed_with)
            key = json.dumps(how, sort_keys=True)
            if key not in writers:
                writers[key] = SegmentWriter(namespace, *how, planes=False)
            writer = writers[key]
            for start in range(0, len(entries), shard_rows):
                batch = entries[start : start + shard_rows]
                features = [namespace.read(entry, check=True) for entry in batch]
                embeddings = np.stack([embedding for embedding, _ in features])
                early = np.stack([early for _, early in features])
                writer.write_batch(
                    [entry.key for entry in batch],
                    embeddings,
                    early,
                    [entry.original_size for entry in batch],
                    [entry.resized_size for entry in batch],
                )
                report.entries_rewritten += len(batch)
                report.bytes_read += embeddings.nbytes + early.nbytes
                if progress is not None:
                    progress(report.entries_rewritten, total)
    return report
