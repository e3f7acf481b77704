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
from pipeline.shapes import EMBEDDING_SHAPE, PLANE_SHAPE
from pipeline.store.commit import CommitFile
from pipeline.store.index import Entry
from pipeline.store.layouts import (
    EARLY,
    EMBEDDING,
    LAYOUTS,
    PLANE,
    PLANE_BYTES,
    PLANE_LAYOUT,
    RAW_LAYOUT,
    all_finite,
    plane_offset,
)
from pipeline.store.namespace import Namespace
from pipeline.store.shards import INDEX_CRC_BYTES, INDEX_ENTRY_BYTES, parse_shard_index, shard_file

# Rows per segment: bounds the commit file a writer rewrites after every batch (~100 bytes a row).
SEGMENT_ROWS = 2048
# A writer that has not written for this long starts a fresh segment instead of appending: `store gc`
# only touches segments idle for longer (its grace period, default an hour), so gc and a writer never
# work on the same segment.
SEGMENT_IDLE_S = 600.0
# Threads of a writer that check and hash a batch (xxhash and numpy release the GIL on large buffers).
WRITER_THREADS = min(8, os.cpu_count() or 1)


class SegmentWriter:
    """Appends batches to a fresh segment owned by this writer alone; each batch commits atomically.

    With `planes` (what `extract` writes) the segment is of layout 3 and every batch carries its entries'
    stride-4 planes; without (`store migrate`, which has the features but not the images), of layout 2.
    """

    def __init__(
        self,
        namespace: Namespace,
        early_channels: int,
        shard_rows: int,
        computed_with: dict | None = None,
        planes: bool = True,
    ) -> None:
        self.namespace = namespace
        self.layout = LAYOUTS[PLANE_LAYOUT if planes else RAW_LAYOUT]
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
        arrays = [(EMBEDDING, (EMBEDDING_SHAPE[0], *grid), "float16"), (EARLY, (self.early_channels, *grid), "float16")]
        if self.layout.has_plane:
            arrays.append((PLANE, PLANE_SHAPE, "uint8"))
        for name, row_shape, dtype in arrays:
            self._arrays[name] = zarr.create_array(
                self.namespace.store.zarr_store,
                name=f"{base}/{name}",
                shape=(SEGMENT_ROWS, *row_shape),
                chunks=(1, *row_shape),
                shards=(self.shard_rows, *row_shape),
                dtype=dtype,
                serializer=zarr.codecs.BytesCodec(endian="little"),
                compressors=None,  # raw chunks: readers map them (see pipeline.store.layouts)
                fill_value=0,
                # Rows are never all zero; zarr's test for "empty" chunks otherwise costs as much as the write.
                config={"write_empty_chunks": True},
            )

    def _chunk_offsets(self, name: str, shard: int, count: int, chunk_bytes: int) -> list[int]:
        """Where the first `count` chunks (of `chunk_bytes` each) start in a shard just written, from zarr's own
        shard index."""
        relative = shard_file(self.namespace.fingerprint, self._segment or "", name, shard)
        tail_bytes = self.shard_rows * INDEX_ENTRY_BYTES + INDEX_CRC_BYTES
        tail = self.namespace.store.fs.cat_file(self.namespace.store.path(relative), start=-tail_bytes)
        index = parse_shard_index(tail, self.shard_rows, f"{self.namespace.store.url}: {relative}")
        if (index[:count, 1] != chunk_bytes).any():  # a zarr that wrote another encoding: never guess
            raise RefineError(f"{self.namespace.store.url}: {relative}: chunks are not raw as expected")
        return [int(offset) for offset in index[:count, 0]]

    def _write_shard(
        self, embeddings: np.ndarray, early: np.ndarray, planes: np.ndarray | None
    ) -> tuple[int, list[int], list[int]]:
        """Write a batch into the segment's next shard of each array; returns its first row and where each
        entry's embedding and early chunk start in their shard files."""
        count = len(embeddings)
        shard = self._next_shard
        start = shard * self.shard_rows
        rows = slice(start, start + count)
        # Each batch fills one whole fresh shard per array: no shard is ever rewritten.
        self._arrays[EMBEDDING][rows] = embeddings
        self._arrays[EARLY][rows] = early
        if planes is not None:
            self._arrays[PLANE][rows] = planes
        self._next_shard += 1
        grid = EMBEDDING_SHAPE[1] * EMBEDDING_SHAPE[2]
        embedding_at = self._chunk_offsets(EMBEDDING, shard, count, 2 * EMBEDDING_SHAPE[0] * grid)
        early_at = self._chunk_offsets(EARLY, shard, count, 2 * self.early_channels * grid)
        if planes is not None:
            # Readers compute where a plane starts (the commit row has no column for it): never guess.
            plane_at = self._chunk_offsets(PLANE, shard, count, PLANE_BYTES)
            if plane_at != [plane_offset(start + i, self.shard_rows) for i in range(count)]:
                where = f"{self.namespace.store.url}: segment {self._segment}"
                raise RefineError(f"{where}: its planes are not in row order; nothing of this batch was committed")
        return start, embedding_at, early_at

    def write_batch(
        self,
        keys: list[str],
        embeddings: np.ndarray,
        early: np.ndarray,
        original_sizes: list[tuple[int, int]],
        resized_sizes: list[tuple[int, int]],
        planes: np.ndarray | None = None,
    ) -> None:
        """Write up to `shard_rows` entries (n x 256 x 64 x 64 and n x C x 64 x 64 float16, and in layout 3 their
        n x 3 x 256 x 256 uint8 planes) and commit them."""
        count = len(keys)
        if not 0 < count <= self.shard_rows:
            raise ValueError(f"a batch holds 1 to {self.shard_rows} entries, got {count}")
        if (planes is not None) != self.layout.has_plane:
            raise ValueError(f"a segment of layout {self.layout.number} takes planes exactly when it holds them")
        finite = self._pool.map(lambda i: all_finite(embeddings[i]) and all_finite(early[i]), range(count))
        if not all(finite):
            raise RefineError("the encoder produced non-finite features (NaN or inf); nothing was written")
        digests = [
            self._pool.submit(self.layout.digest, embeddings[i], early[i], None if planes is None else planes[i])
            for i in range(count)
        ]
        full = (self._next_shard + 1) * self.shard_rows > SEGMENT_ROWS
        if self._segment is None or full or time.monotonic() - self._last_write > SEGMENT_IDLE_S:
            self._open_segment()
        assert self._segment is not None
        start, embedding_at, early_at = self._write_shard(embeddings, early, planes)
        for i, key in enumerate(keys):
            entry = Entry(
                key,
                self._segment,
                start + i,
                original_sizes[i],
                resized_sizes[i],
                digests[i].result(),
                self.layout.number,
                self.shard_rows,
                self.early_channels,
                (embedding_at[i], early_at[i]),
            )
            self._entries.append(self.layout.commit_row(entry))
        commit = CommitFile(
            self._segment, self.layout, self.shard_rows, self.early_channels, self.computed_with, self._entries
        )
        self.namespace.write_commit(commit)
        self._last_write = time.monotonic()
