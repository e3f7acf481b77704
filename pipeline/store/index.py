"""The index of a namespace's committed entries: numpy columns in memory, and a compacted copy on disk.

In memory, `EntryIndex` maps key -> `Entry` like a dict, but holds one row of numpy columns per key (sorted
by key, found by binary search) and builds an `Entry` only when one is asked for: a million entries are
~110 MB of arrays instead of a million tuples, strings and dict slots, and `positions` joins a whole
dataset in one vectorised call.

On disk, `<fingerprint>/index.npz` is a cache of the resolved index (latest copy of every key) together
with the commit files it was built from and their stamps (size, modification time, inode or ETag, from
one listing). Commit files stay the truth: a reader uses the compacted index only when every commit file
it covers is still listed with the same stamp, and parses the commit files it does not cover (new
segments) on top of it, latest segment winning as before. A covered commit file that changed or vanished
makes it stale, a damaged one (bad zip, digest, shapes, order) makes it ignored: either way the reader
parses every commit file, as without an index, and never sees an entry that is not committed. It is
written atomically by `refine store gc` and at the end of `refine extract`; two writers of it at once
each leave a complete and correct index (the last one stays).
"""

from __future__ import annotations

import io
from collections.abc import ItemsView, Iterator, Mapping, Sequence, ValuesView
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

import numpy as np
import orjson
import xxhash


INDEX_FILE = "index.npz"
INDEX_FORMAT = "refine-entry-index"
INDEX_VERSION = 1
_ROW_ARRAYS = ("keys", "segment", "row", "sizes", "digests", "offsets")
_SEGMENT_ARRAYS = ("layouts", "shard_rows", "channels")


class Entry(NamedTuple):
    """One committed image: where its features live and what they must hash to. A tuple: a tuple is built
    ~5 x faster than a frozen dataclass, and an `EntryIndex` builds one on every lookup."""

    key: str
    segment: str
    row: int
    original_size: tuple[int, int]  # height, width after EXIF orientation
    resized_size: tuple[int, int]  # height, width inside the 1024 x 1024 encoder input
    digest: str  # of the embedding bytes followed by the early-feature bytes, by the layout's hash
    layout: int = 1  # see pipeline.store.layouts
    shard_rows: int = 0  # rows per shard file (layout 2)
    early_channels: int = 0  # C of the early feature (layout 2)
    offsets: tuple[int, int] = (0, 0)  # where the embedding and the early chunk start in their shards (layout 2)


def file_stamp(info: dict[str, Any]) -> list[Any]:
    """What identifies one version of a file in an fsspec listing: size, modification time and inode (local)
    or ETag (object stores). An atomic replace gives a new inode / ETag and a new time."""
    when = next(
        (info[k] for k in ("mtime", "LastModified", "last_modified", "created") if info.get(k) is not None), None
    )
    if isinstance(when, datetime):
        when = when.isoformat()
    identity = next((info[k] for k in ("ino", "ETag", "etag", "md5Hash") if info.get(k) is not None), None)
    return [int(info.get("size") or 0), when, identity if isinstance(identity, (int, str)) else str(identity)]


@dataclass
class SegmentRows:
    """The committed rows of some segments, as columns (n rows), and what each segment's rows share."""

    keys: np.ndarray  # n, bytes (utf-8)
    segment: np.ndarray  # n int32, index into `segments`
    row: np.ndarray  # n int64, row in the segment's arrays
    sizes: np.ndarray  # n x 4 int32: original height, width, resized height, width
    digests: np.ndarray  # n, bytes (ascii hex)
    offsets: np.ndarray  # n x 2 int64: where the embedding and early chunk start in their shards (layout 2)
    segments: list[str]  # s segment names
    layouts: np.ndarray  # s int32
    shard_rows: np.ndarray  # s int32
    channels: np.ndarray  # s int32


class EntryIndex(Mapping[str, Entry]):
    """Key -> Entry over columns sorted by key, one row per key; `Entry` objects are built on access."""

    def __init__(self, rows: SegmentRows) -> None:
        self.rows = rows
        self._layouts = rows.layouts.tolist()
        self._shard_rows = rows.shard_rows.tolist()
        self._channels = rows.channels.tolist()

    @classmethod
    def resolve(cls, parts: Sequence[SegmentRows]) -> EntryIndex:
        """The latest copy of every key over `parts` (segment names are time-ordered: the later name wins)."""
        names = sorted({name for part in parts for name in part.segments})
        rank = {name: i for i, name in enumerate(names)}
        if not parts:
            return cls(_EMPTY)
        segment = np.concatenate(
            [np.array([rank[name] for name in part.segments], np.int32)[part.segment] for part in parts]
        )
        keys = np.concatenate([part.keys for part in parts])
        order = np.lexsort((segment, keys))  # by key, then by segment: the last of each key's run wins
        keys = keys[order]
        last = np.ones(len(keys), bool)
        last[:-1] = keys[1:] != keys[:-1]
        chosen = order[last]

        def column(name: str) -> np.ndarray:
            return np.concatenate([getattr(part, name) for part in parts])[chosen]

        def per_segment(name: str) -> np.ndarray:
            values = np.zeros(len(names), np.int32)
            for part in parts:
                values[[rank[n] for n in part.segments]] = getattr(part, name)
            return values

        return cls(
            SegmentRows(
                keys[last],
                segment[chosen],
                column("row"),
                column("sizes"),
                column("digests"),
                column("offsets"),
                names,
                per_segment("layouts"),
                per_segment("shard_rows"),
                per_segment("channels"),
            )
        )

    # -- lookups -----------------------------------------------------------------------------------
    def positions(self, keys: Sequence[str] | np.ndarray) -> np.ndarray:
        """Where each key's row is (int64, -1 for a key not held): the join of a whole dataset in one call."""
        probe = (
            np.array([k.encode() if isinstance(k, str) else bytes(k) for k in keys], dtype=bytes)
            if len(keys)
            else np.zeros(0, "S1")
        )
        found = np.searchsorted(self.rows.keys, probe)
        inside = found < len(self.rows.keys)
        hit = np.zeros(len(probe), bool)
        hit[inside] = self.rows.keys[found[inside]] == probe[inside]  # compared untruncated
        return np.where(hit, found, -1).astype(np.int64)

    def layouts(self) -> np.ndarray:
        """The segment layout of every entry (n int32), without building the entries."""
        return self.rows.layouts[self.rows.segment]

    def entry_at(self, position: int) -> Entry:
        """The Entry of row `position` (0 <= position < len)."""
        rows = self.rows
        s = int(rows.segment[position])
        oh, ow, rh, rw = rows.sizes[position].tolist()
        embedding_at, early_at = rows.offsets[position].tolist()
        return Entry(
            rows.keys[position].decode(),
            rows.segments[s],
            int(rows.row[position]),
            (oh, ow),
            (rh, rw),
            rows.digests[position].decode(),
            self._layouts[s],
            self._shard_rows[s],
            self._channels[s],
            (embedding_at, early_at),
        )

    def _position(self, key: object) -> int:
        if not isinstance(key, str):
            return -1
        probe = key.encode()
        found = int(np.searchsorted(self.rows.keys, probe))
        return found if found < len(self.rows.keys) and self.rows.keys[found] == probe else -1

    def __getitem__(self, key: str) -> Entry:
        position = self._position(key)
        if position < 0:
            raise KeyError(key)
        return self.entry_at(position)

    def get(self, key: str, default: Any = None) -> Any:
        position = self._position(key)
        return default if position < 0 else self.entry_at(position)

    def __contains__(self, key: object) -> bool:
        return self._position(key) >= 0

    def __len__(self) -> int:
        return len(self.rows.keys)

    def __iter__(self) -> Iterator[str]:
        return (key.decode() for key in self.rows.keys.tolist())

    def values(self) -> ValuesView[Entry]:
        return _Values(self)

    def items(self) -> ItemsView[str, Entry]:
        return _Items(self)

    # -- the compacted copy ------------------------------------------------------------------------
    def to_bytes(self, covered: dict[str, list[Any]]) -> bytes:
        """The index as an .npz file, with the commit files it covers (segment -> stamp)."""
        arrays = {name: getattr(self.rows, name) for name in _ROW_ARRAYS + _SEGMENT_ARRAYS}
        meta = {
            "format": INDEX_FORMAT,
            "version": INDEX_VERSION,
            "segments": self.rows.segments,
            "covered": covered,
            "digest": _digest(arrays),
        }
        buffer = io.BytesIO()
        np.savez(buffer, meta=np.frombuffer(orjson.dumps(meta), np.uint8), **arrays)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> tuple[EntryIndex, dict[str, list[Any]]]:
        """An index written by `to_bytes` and what it covers; ValueError if it is damaged in any way."""
        try:
            return cls._parse(data)
        except ValueError:
            raise
        except Exception as error:  # numpy, zipfile and orjson raise a dozen types on damaged bytes
            text = str(error).strip().splitlines()
            raise ValueError(f"unreadable ({type(error).__name__}{f': {text[0][:160]}' if text else ''})") from None

    @classmethod
    def _parse(cls, data: bytes) -> tuple[EntryIndex, dict[str, list[Any]]]:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            meta = orjson.loads(npz["meta"].tobytes())
            arrays = {name: npz[name] for name in _ROW_ARRAYS + _SEGMENT_ARRAYS}
        if not isinstance(meta, dict) or meta.get("format") != INDEX_FORMAT or meta.get("version") != INDEX_VERSION:
            raise ValueError("not an entry index of this refine's version")
        if meta.get("digest") != _digest(arrays):
            raise ValueError("its contents do not match their digest")
        count, segments = len(arrays["keys"]), meta["segments"]
        shapes = [arrays[n].shape for n in _ROW_ARRAYS]
        if shapes != [(count,), (count,), (count,), (count, 4), (count,), (count, 2)] or any(
            arrays[n].shape != (len(segments),) for n in _SEGMENT_ARRAYS
        ):
            raise ValueError("its columns have inconsistent shapes")
        keys, segment = arrays["keys"], arrays["segment"]
        if arrays["keys"].dtype.kind != "S" or arrays["digests"].dtype.kind != "S":
            raise ValueError("its keys or digests are not bytes")
        if (count and (segment.min() < 0 or segment.max() >= len(segments))) or (keys[1:] <= keys[:-1]).any():
            raise ValueError("its rows are out of order or name unknown segments")
        if not isinstance(meta.get("covered"), dict) or not set(segments) <= set(meta["covered"]):
            raise ValueError("it does not say which commit files it covers")
        rows = SegmentRows(**{n: arrays[n] for n in _ROW_ARRAYS + _SEGMENT_ARRAYS}, segments=list(segments))
        return cls(rows), meta["covered"]


_EMPTY = SegmentRows(
    *(np.zeros(shape, dtype) for shape, dtype in ((0, "S1"), (0, np.int32), (0, np.int64), ((0, 4), np.int32))),
    *(np.zeros(shape, dtype) for shape, dtype in ((0, "S1"), ((0, 2), np.int64))),
    [],
    *(np.zeros(0, np.int32) for _ in _SEGMENT_ARRAYS),
)


def _digest(arrays: dict[str, np.ndarray]) -> str:
    hasher = xxhash.xxh3_128()
    for name in sorted(arrays):
        hasher.update(f"{name}:{arrays[name].dtype.str}:{arrays[name].shape};".encode())
        hasher.update(np.ascontiguousarray(arrays[name]).data)
    return hasher.hexdigest()


class _Values(ValuesView):
    def __iter__(self) -> Iterator[Entry]:
        index: EntryIndex = self._mapping  # type: ignore[assignment]
        return (index.entry_at(i) for i in range(len(index)))


class _Items(ItemsView):
    def __iter__(self) -> Iterator[tuple[str, Entry]]:
        index: EntryIndex = self._mapping  # type: ignore[assignment]
        return ((entry.key, entry) for entry in (index.entry_at(i) for i in range(len(index))))
