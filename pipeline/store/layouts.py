"""The segment layouts: how the bytes of one entry lie inside a segment's shard files, how its commit row
reads, and how the entry is read back and checked. The one place that knows what a layout number means.

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

A new layout is one more `Layout` here, one more line in `LAYOUTS`, and its test.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

import numpy as np
import xxhash

from pipeline.errors import RefineError
from pipeline.shapes import EMBEDDING_SHAPE, PLANE_SHAPE
from pipeline.store.shards import SegmentFiles

if TYPE_CHECKING:
    from pipeline.store.index import Entry

EMBEDDING = "embedding"
EARLY = "early"
PLANE = "plane"
PLANE_BYTES = int(np.prod(PLANE_SHAPE))
Features = tuple[np.ndarray, np.ndarray, "np.ndarray | None"]  # embedding, early feature, plane (or None)


def all_finite(array: np.ndarray) -> bool:
    """No NaN or inf in the array. For float16 it tests the exponent bits: numpy's isfinite converts float16
    element by element in software and costs about twice as long as the whole zarr write of a batch."""
    if array.dtype != np.float16:
        return bool(np.isfinite(array).all())
    return not ((np.ascontiguousarray(array).view(np.uint16) & 0x7C00) == 0x7C00).any()


class Layout:
    """Layout 1: zstd chunks read through zarr, BLAKE2b digests, commit rows of 7 fields:
    [key, row, height, width, resized height, resized width, digest]."""

    number = 1
    description = "zstd chunks, BLAKE2b digests, read through zarr (`refine store migrate` reads it at disk speed)"
    mapped = False  # read straight from the page cache; else through zarr, and `store migrate` rewrites it
    has_plane = False  # holds each entry's stride-4 plane
    row_fields = 7
    arrays = (EMBEDDING, EARLY)

    def digest(self, embedding: np.ndarray, early: np.ndarray, plane: np.ndarray | None = None) -> str:
        """BLAKE2b-128 of the embedding bytes followed by the early-feature bytes."""
        digest = hashlib.blake2b(digest_size=16)
        digest.update(np.ascontiguousarray(embedding).data)
        digest.update(np.ascontiguousarray(early).data)
        return digest.hexdigest()

    def commit_row(self, entry: Entry) -> list[Any]:
        """An entry as its commit file's row."""
        return [entry.key, entry.row, *entry.original_size, *entry.resized_size, entry.digest]

    def recorded_shape(self, commit: dict[str, Any]) -> tuple[int, int]:
        """(rows per shard, early channels) as a commit file of this layout records them (0: not recorded)."""
        return int(commit.get("shard_rows", 0)), int(commit.get("early_channels", 0))

    def entry_shape(self, shard_rows: int, early_channels: int) -> tuple[int, int]:
        """What an entry carries of its segment's (rows per shard, early channels): a mapped read needs
        both, a read through zarr neither."""
        return (shard_rows, early_channels) if self.mapped else (0, 0)

    def read(self, files: SegmentFiles, entry: Entry, with_plane: bool) -> Features:
        """The entry's embedding and early feature as stored (unchecked); this layout has no plane."""
        return files.zarr_row(entry, EMBEDDING), files.zarr_row(entry, EARLY), None


class RawLayout(Layout):
    """Layout 2: raw float16 chunks mapped from the page cache, xxh3-128 digests, commit rows of 9 fields:
    layout 1's and where the embedding and the early chunk start in their shard files."""

    number = 2
    description = "raw float16 chunks, xxh3-128 digests, mapped from the page cache; no stride-4 plane"
    mapped = True
    row_fields = 9

    def digest(self, embedding: np.ndarray, early: np.ndarray, plane: np.ndarray | None = None) -> str:
        """xxh3-128 of the embedding bytes, then the early-feature bytes, then (with a plane) the plane's
        bytes (~25 GB/s)."""
        digest = xxhash.xxh3_128()
        for array in (embedding, early, plane) if self.has_plane else (embedding, early):
            digest.update(np.ascontiguousarray(array).view(np.uint8))
        return digest.hexdigest()

    def commit_row(self, entry: Entry) -> list[Any]:
        return [*super().commit_row(entry), *entry.offsets]

    def recorded_shape(self, commit: dict[str, Any]) -> tuple[int, int]:
        return int(commit["shard_rows"]), int(commit["early_channels"])  # a mapped read needs both

    def read(self, files: SegmentFiles, entry: Entry, with_plane: bool) -> Features:
        shard = entry.row // entry.shard_rows
        arrays = []
        for name, channels, offset in (
            (EMBEDDING, EMBEDDING_SHAPE[0], entry.offsets[0]),
            (EARLY, entry.early_channels, entry.offsets[1]),
        ):
            shape = (channels, *EMBEDDING_SHAPE[1:])
            chunk = files.chunk(entry.segment, name, shard, offset, 2 * channels * shape[1] * shape[2])
            arrays.append(chunk.view("<f2").reshape(shape))
        return arrays[0], arrays[1], None


class PlaneLayout(RawLayout):
    """Layout 3: layout 2 and each entry's stride-4 plane, at a place computed from its row."""

    number = 3
    description = "layout 2 and each entry's stride-4 image plane (what the refiner's fine stage reads)"
    has_plane = True
    arrays = (EMBEDDING, EARLY, PLANE)

    def read(self, files: SegmentFiles, entry: Entry, with_plane: bool) -> Features:
        embedding, early, _ = super().read(files, entry, with_plane)
        if not with_plane:
            return embedding, early, None
        shard = entry.row // entry.shard_rows
        plane = files.chunk(entry.segment, PLANE, shard, plane_offset(entry.row, entry.shard_rows), PLANE_BYTES)
        return embedding, early, plane.reshape(PLANE_SHAPE)


def plane_offset(row: int, shard_rows: int) -> int:
    """Where a layout-3 entry's plane starts in its shard file: the chunks lie in row order from byte 0."""
    return (row % shard_rows) * PLANE_BYTES


LAYOUTS: dict[int, Layout] = {layout.number: layout for layout in (Layout(), RawLayout(), PlaneLayout())}
LEGACY_LAYOUT, RAW_LAYOUT, PLANE_LAYOUT = 1, 2, 3
CURRENT_LAYOUT = PLANE_LAYOUT


def layout_of(number: int, where: str) -> Layout:
    """The layout a commit file names; one this refine does not know is a RefineError naming `where`."""
    layout = LAYOUTS.get(number)
    if layout is None:
        raise RefineError(f"{where} has layout {number}, which this refine cannot read; use a newer one")
    return layout
