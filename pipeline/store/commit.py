"""The commit file of one segment, `<fingerprint>/commits/<segment>.json`: the one type that writes and reads it.

It names the segment's layout, what its rows share (rows per shard, early channels), how its features were
computed, and one row per committed entry, as the layout writes rows (`pipeline.store.layouts`). Readers see
exactly the rows named here; a writer replaces the whole file atomically after each batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from pipeline.errors import RefineError
from pipeline.store.index import Entry, SegmentRows
from pipeline.store.layouts import LEGACY_LAYOUT, Layout, layout_of

_DAMAGE = (AttributeError, KeyError, TypeError, ValueError, OverflowError, UnicodeError)


def commit_path(fingerprint: str, segment: str) -> str:
    """The commit file of a segment, relative to the store root."""
    return f"{fingerprint}/commits/{segment}.json"


@dataclass(frozen=True)
class CommitFile:
    """One segment's committed rows (`rows`, each as `layout.commit_row` writes it) and what they share."""

    segment: str
    layout: Layout
    shard_rows: int
    early_channels: int
    computed_with: dict[str, Any] = field(default_factory=dict)
    rows: list[list[Any]] = field(default_factory=list)
    where: str = field(default="", compare=False)  # the store and file it was read from, for its errors

    @classmethod
    def parse(cls, raw: Any, segment: str, where: str) -> CommitFile:
        """A commit file as read (JSON); a damaged one is a RefineError naming `where`."""
        try:
            layout = layout_of(int(raw.get("layout", LEGACY_LAYOUT)), where)
            rows = raw["entries"]
            if not isinstance(rows, list) or any(
                not isinstance(row, list) or len(row) != layout.row_fields for row in rows
            ):
                raise ValueError(f"rows of {layout.row_fields} fields expected")
            computed_with = raw.get("computed_with") or {}
            if not isinstance(computed_with, dict):
                raise ValueError("computed_with is not an object")
            return cls(segment, layout, *layout.recorded_shape(raw), computed_with, rows, where)
        except _DAMAGE as error:
            raise RefineError(f"{where} is damaged (bad entries: {error})") from None

    def to_json(self) -> dict[str, Any]:
        return {
            "segment": self.segment,
            "layout": self.layout.number,
            "shard_rows": self.shard_rows,
            "early_channels": self.early_channels,
            "computed_with": self.computed_with,
            "entries": self.rows,
        }

    def with_entries(self, entries: list[Entry]) -> CommitFile:
        """The same commit holding only `entries` (`store gc` drops duplicate copies)."""
        return replace(self, rows=[self.layout.commit_row(entry) for entry in entries])

    def entries(self) -> list[Entry]:
        """The committed rows as entries; a row that does not parse is a RefineError naming the file."""
        shard_rows, channels = self.layout.entry_shape(self.shard_rows, self.early_channels)
        # One tuple per distinct size and offset pair, shared by the rows that have it: a dataset has few
        # distinct image sizes and a shard only `shard_rows` offsets, and a million rows add up.
        shared: dict[tuple[int, int], tuple[int, int]] = {}

        def pair(a: Any, b: Any) -> tuple[int, int]:
            return shared.setdefault((int(a), int(b)), (int(a), int(b)))

        try:
            return [
                Entry(
                    str(row[0]),
                    self.segment,
                    int(row[1]),
                    pair(row[2], row[3]),
                    pair(row[4], row[5]),
                    str(row[6]),
                    self.layout.number,
                    shard_rows,
                    channels,
                    pair(row[7], row[8]) if self.layout.mapped else (0, 0),
                )
                for row in self.rows
            ]
        except _DAMAGE as error:
            raise RefineError(f"{self.where} is damaged (bad entries: {error})") from None

    def columns(self) -> SegmentRows:
        """The committed rows as index columns; a row that does not parse is a RefineError naming the file."""
        try:
            width = self.layout.row_fields
            columns = list(zip(*self.rows, strict=True)) if self.rows else [()] * width
            count = len(self.rows)
            keys = np.array([str(key).encode() for key in columns[0]], dtype=bytes)
            digests = np.array([str(digest).encode() for digest in columns[6]], dtype=bytes)
            offsets = np.array(columns[7:9], dtype=np.int64).T if self.layout.mapped else np.zeros((count, 2), np.int64)
            shard_rows, channels = self.layout.entry_shape(self.shard_rows, self.early_channels)
            return SegmentRows(
                keys,
                np.zeros(count, np.int32),
                np.array(columns[1], dtype=np.int64),
                np.array(columns[2:6], dtype=np.int32).T.reshape(count, 4),
                digests,
                offsets.reshape(count, 2),
                [self.segment],
                np.array([self.layout.number], np.int32),
                np.array([shard_rows], np.int32),
                np.array([channels], np.int32),
            )
        except _DAMAGE as error:
            raise RefineError(f"{self.where} is damaged (bad entries: {error})") from None
