"""Writing into the feature store: one writer appends batches to a segment that it alone owns.

Each batch becomes one whole, fresh shard file per array (never rewritten), then the segment's commit file
is replaced atomically: readers see the batch entirely or not at all (see `pipeline.store`). Several
writers, in one process or on many machines, each own their segment and never share a file.
"""

from __future__ import annotations

import os
import secrets
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import zarr
import zarr.codecs

from pipeline.errors import RefineError
from pipeline.segment_layout import CURRENT_LAYOUT, INDEX_CRC_BYTES, INDEX_ENTRY_BYTES, parse_shard_index, shard_file
from pipeline.shapes import EMBEDDING_SHAPE
from pipeline.store import EARLY, EMBEDDING, Namespace, all_finite, entry_digest
from pipeline.store_index import Entry, commit_row

# Rows per segment: bounds the commit file a writer rewrites after every batch (~100 bytes a row).
SEGMENT_ROWS = 2048
# A writer that has not written for this long starts a fresh segment instead of appending: `store gc`
# only touches segments idle for longer (its grace period, default an hour), so gc and a writer never
# work on the same segment.
SEGMENT_IDLE_S = 600.0
# Threads of a writer that check and hash a batch (xxhash and numpy release the GIL on large buffers).
WRITER_THREADS = min(8, os.cpu_count() or 1)


class SegmentWriter:
    """Appends batches to a fresh segment owned by this writer alone; each batch commits atomically."""

    def __init__(
        self, namespace: Namespace, early_channels: int, shard_rows: int, computed_with: dict | None = None
    ) -> None:
        self.namespace = namespace
        self.early_channels = early_channels
        self.shard_rows = shard_rows
        # How this writer's features were computed (device, precision, kernels): provenance that may differ
        # between segments of one namespace without changing what the features mean.
        self.computed_with = computed_with or {}
        self._segment: str | None = None
        self._arrays: dict[str, zarr.Array] = {}
        self._entries: list[list] = []
        self._next_shard = 0
        self._last_write = 0.0  # time.monotonic() of the segment's last write
        # Checks and digests run here while zarr writes on its own event-loop thread (both release the GIL).
        self._pool = ThreadPoolExecutor(WRITER_THREADS, thread_name_prefix="refine-digest")

    def new_segment(self) -> None:
        """Put the next batch into a fresh segment (named later than every segment that exists now)."""
        self._segment = None

    def _open_segment(self) -> None:
        self.namespace.store.mark_current_version()
        # Time-ordered and random: unique across processes and machines without coordination.
        self._segment = f"{time.time_ns():020d}-{secrets.token_hex(4)}"
        self._entries = []
        self._next_shard = 0
        self._last_write = time.monotonic()
        base = f"{self.namespace.fingerprint}/segments/{self._segment}"
        zarr.open_group(self.namespace.store.zarr_store, path=base, mode="w-")
        grid = EMBEDDING_SHAPE[1:]
        for name, channels in ((EMBEDDING, EMBEDDING_SHAPE[0]), (EARLY, self.early_channels)):
            self._arrays[name] = zarr.create_array(
                self.namespace.store.zarr_store,
                name=f"{base}/{name}",
                shape=(SEGMENT_ROWS, channels, *grid),
                chunks=(1, channels, *grid),
                shards=(self.shard_rows, channels, *grid),
                dtype="float16",
                serializer=zarr.codecs.BytesCodec(endian="little"),
                compressors=None,  # raw chunks: readers map them (see pipeline.segment_layout)
                fill_value=0,
                # Rows are never all zero; zarr's test for "empty" chunks otherwise costs as much as the write.
                config={"write_empty_chunks": True},
            )

    def _chunk_offsets(self, name: str, shard: int, count: int, channels: int) -> list[int]:
        """Where the first `count` chunks start in a shard just written, from zarr's own shard index."""
        relative = shard_file(self.namespace.fingerprint, self._segment or "", name, shard)
        tail_bytes = self.shard_rows * INDEX_ENTRY_BYTES + INDEX_CRC_BYTES
        tail = self.namespace.store.fs.cat_file(self.namespace.store.path(relative), start=-tail_bytes)
        index = parse_shard_index(tail, self.shard_rows, f"{self.namespace.store.url}: {relative}")
        chunk_bytes = 2 * channels * EMBEDDING_SHAPE[1] * EMBEDDING_SHAPE[2]
        if (index[:count, 1] != chunk_bytes).any():  # a zarr that wrote another encoding: never guess
            raise RefineError(f"{self.namespace.store.url}: {relative}: chunks are not raw float16 as expected")
        return [int(offset) for offset in index[:count, 0]]

    def write_batch(
        self,
        keys: list[str],
        embeddings: np.ndarray,
        early: np.ndarray,
        original_sizes: list[tuple[int, int]],
        resized_sizes: list[tuple[int, int]],
    ) -> None:
        """Write up to `shard_rows` entries (n x 256 x 64 x 64 and n x C x 64 x 64 float16) and commit them."""
        count = len(keys)
        if not 0 < count <= self.shard_rows:
            raise ValueError(f"a batch holds 1 to {self.shard_rows} entries, got {count}")
        finite = self._pool.map(lambda i: all_finite(embeddings[i]) and all_finite(early[i]), range(count))
        if not all(finite):
            raise RefineError("the encoder produced non-finite features (NaN or inf); nothing was written")
        digests = [self._pool.submit(entry_digest, embeddings[i], early[i]) for i in range(count)]
        full = (self._next_shard + 1) * self.shard_rows > SEGMENT_ROWS
        if self._segment is None or full or time.monotonic() - self._last_write > SEGMENT_IDLE_S:
            self._open_segment()
        assert self._segment is not None
        shard = self._next_shard
        start = shard * self.shard_rows
        rows = slice(start, start + count)
        # Each batch fills one whole fresh shard per array: no shard is ever rewritten.
        self._arrays[EMBEDDING][rows] = embeddings
        self._arrays[EARLY][rows] = early
        self._next_shard += 1
        embedding_at = self._chunk_offsets(EMBEDDING, shard, count, EMBEDDING_SHAPE[0])
        early_at = self._chunk_offsets(EARLY, shard, count, self.early_channels)
        for i, key in enumerate(keys):
            entry = Entry(
                key,
                self._segment,
                start + i,
                original_sizes[i],
                resized_sizes[i],
                digests[i].result(),
                CURRENT_LAYOUT,
                self.shard_rows,
                self.early_channels,
                (embedding_at[i], early_at[i]),
            )
            self._entries.append(commit_row(entry))
        commit = {
            "segment": self._segment,
            "layout": CURRENT_LAYOUT,
            "shard_rows": self.shard_rows,
            "early_channels": self.early_channels,
            "computed_with": self.computed_with,
            "entries": self._entries,
        }
        self.namespace.store.write_json_atomic(f"{self.namespace.fingerprint}/commits/{self._segment}.json", commit)
        self._last_write = time.monotonic()
