"""How the bytes of one entry lie inside a segment's shard files, and how they are read back and checked.

A segment records its layout in its commit file; each layout is one way to find and check an entry:

- layout 1 (stores written before layouts existed): chunks compressed with Blosc zstd, an entry's digest
  is BLAKE2b. Read through zarr (shard index, decompression), about 10 x slower than the disk.
- layout 2: chunks stored as plain little-endian float16, still Zarr v3 (any zarr reader opens the
  arrays; the shard index carries zarr's own crc32c). The commit row also records where each chunk starts
  in its shard file and an xxh3-128 digest of the entry's bytes, so a reader maps the two chunks straight
  from the page cache and hashes them at memory speed: no zarr call, no decode, no copy.
- layout 3: layout 2 and a third array, the entry's stride-4 plane (3 x 256 x 256 uint8, the encoder input
  averaged over 4 x 4 pixels: what the refiner's fine stage reads). Its digest covers all three arrays. The
  commit row stays that of layout 2: the writer checks against zarr's shard index that the plane chunks lie
  in row order from the start of their shard, so a reader computes where a plane starts and maps it too.

Why mapping is safe here: a shard file is written once, whole, and never rewritten in place (every batch
goes into a fresh shard, `store gc` only unlinks), so a mapped file never shrinks under a reader. A file
that is shorter than its commit says (truncated by damage) is refused before it is mapped.
"""

from __future__ import annotations

import hashlib
import mmap
import os
from typing import Any

import google_crc32c  # zarr's own crc32c (a dependency of zarr)
import numpy as np
import xxhash

from pipeline.errors import RefineError

LEGACY_LAYOUT = 1
RAW_LAYOUT = 2
PLANE_LAYOUT = 3
CURRENT_LAYOUT = PLANE_LAYOUT
LAYOUTS = {
    LEGACY_LAYOUT: "zstd chunks, BLAKE2b digests, read through zarr (`refine store migrate` reads it at disk speed)",
    RAW_LAYOUT: "raw float16 chunks, xxh3-128 digests, mapped from the page cache; no stride-4 plane",
    PLANE_LAYOUT: "layout 2 and each entry's stride-4 image plane (what the refiner's fine stage reads)",
}
# Zarr's sharding index: (offset, nbytes) as two little-endian uint64 per chunk, then its crc32c.
INDEX_ENTRY_BYTES = 16
INDEX_CRC_BYTES = 4
_PAGE = mmap.ALLOCATIONGRANULARITY


def plane_offset(row: int, shard_rows: int, plane_bytes: int) -> int:
    """Where a layout-3 entry's plane starts in its shard file: the chunks lie in row order from byte 0."""
    return (row % shard_rows) * plane_bytes


def legacy_digest(embedding: np.ndarray, early: np.ndarray) -> str:
    """Layout 1's digest: BLAKE2b-128 of the embedding bytes followed by the early-feature bytes."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(np.ascontiguousarray(embedding).data)
    digest.update(np.ascontiguousarray(early).data)
    return digest.hexdigest()


def raw_digest(embedding: np.ndarray, early: np.ndarray, plane: np.ndarray | None = None) -> str:
    """Layouts 2 and 3's digest: xxh3-128 of the embedding bytes, then the early-feature bytes, then (layout 3)
    the plane's bytes (~25 GB/s)."""
    digest = xxhash.xxh3_128()
    for array in (embedding, early) if plane is None else (embedding, early, plane):
        digest.update(np.ascontiguousarray(array).view(np.uint8))
    return digest.hexdigest()


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
