"""The bytes of a segment's shard files: where an array's shard lies, zarr's shard index, and reading a chunk.

Why mapping is safe here: a shard file is written once, whole, and never rewritten in place (every batch
goes into a fresh shard, `store gc` only unlinks), so a mapped file never shrinks under a reader. A file
that is shorter than its commit says (truncated by damage) is refused before it is mapped.
"""

from __future__ import annotations

import mmap
import os
from typing import TYPE_CHECKING, Any

import google_crc32c  # zarr's own crc32c (a dependency of zarr)
import numpy as np
import zarr

from pipeline.errors import RefineError

if TYPE_CHECKING:
    from pipeline.store.index import Entry

# Zarr's sharding index: (offset, nbytes) as two little-endian uint64 per chunk, then its crc32c.
INDEX_ENTRY_BYTES = 16
INDEX_CRC_BYTES = 4
_PAGE = mmap.ALLOCATIONGRANULARITY


def shard_file(fingerprint: str, segment: str, array: str, shard: int) -> str:
    """The shard file of one array, relative to the store root (zarr v3's default chunk key encoding)."""
    return f"{fingerprint}/segments/{segment}/{array}/c/{shard}/0/0/0"


def parse_shard_index(tail: bytes, chunks: int, where: str) -> np.ndarray:
    """The (offset, nbytes) of each chunk (chunks x 2, uint64) from the last bytes of a shard file."""
    body, crc = tail[:-INDEX_CRC_BYTES], tail[-INDEX_CRC_BYTES:]
    if len(tail) != chunks * INDEX_ENTRY_BYTES + INDEX_CRC_BYTES or google_crc32c.value(body) != int.from_bytes(
        crc, "little"
    ):
        raise RefineError(f"{where}: the shard index is damaged")
    return np.frombuffer(body, dtype="<u8").reshape(chunks, 2)


def read_chunk(fs: Any, path: str, offset: int, nbytes: int, *, local: bool) -> np.ndarray:
    """`nbytes` bytes of a file from `offset` as a read-only uint8 array; local files are mapped, not copied.

    Raises FileNotFoundError for a missing file and ValueError for one too short to hold the chunk.
    """
    if not local:
        data = fs.cat_file(path, start=offset, end=offset + nbytes)
        if len(data) != nbytes:
            raise ValueError(f"the shard file ends {nbytes - len(data)} bytes before the entry does")
        return np.frombuffer(data, dtype=np.uint8)
    descriptor = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(descriptor).st_size
        if size < offset + nbytes:
            raise ValueError(f"the shard file is {size} bytes, the entry ends at byte {offset + nbytes}")
        start = offset - offset % _PAGE
        mapping = mmap.mmap(
            descriptor,
            offset + nbytes - start,
            flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),  # one fault-in call, not one per page
            prot=mmap.PROT_READ,
            offset=start,
        )
    finally:
        os.close(descriptor)
    return np.frombuffer(mapping, dtype=np.uint8, count=nbytes, offset=offset - start)


class SegmentFiles:
    """The segments of one namespace as a layout reads them: chunks of shard files (mapped where local) and
    rows of zarr arrays (opened once each)."""

    def __init__(self, fs: Any, store_root: str, local: bool, zarr_store: Any, fingerprint: str) -> None:
        self.fs = fs
        self.store_root = store_root
        self.local = local
        self.zarr_store = zarr_store
        self.fingerprint = fingerprint
        self._arrays: dict[tuple[str, str], zarr.Array] = {}

    def chunk(self, segment: str, array: str, shard: int, offset: int, nbytes: int) -> np.ndarray:
        """`nbytes` of one array's shard file from `offset` (see `read_chunk`)."""
        path = f"{self.store_root}/{shard_file(self.fingerprint, segment, array, shard)}"
        return read_chunk(self.fs, path, offset, nbytes, local=self.local)

    def zarr_row(self, entry: Entry, array: str) -> np.ndarray:
        """One entry's row of an array as any zarr reader decodes it (shard index, codecs)."""
        cached = self._arrays.get((entry.segment, array))
        if cached is None:
            path = f"{self.fingerprint}/segments/{entry.segment}/{array}"
            cached = zarr.open_array(self.zarr_store, path=path, mode="r")
            self._arrays[(entry.segment, array)] = cached
        return cached[entry.row]
