"""One namespace of a feature store (the features of one encoder identity): its committed entries (from the
commit files, or the compacted index while it is fresh), reads that check an entry against its digest, and
its dataset manifests."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from pipeline.errors import RefineError
from pipeline.store.commit import CommitFile, commit_path
from pipeline.store.index import INDEX_FILE, Entry, EntryIndex, file_stamp
from pipeline.store.layouts import LAYOUTS, all_finite
from pipeline.store.root import FeatureStore, now
from pipeline.store.shards import SegmentFiles


def drop_damaged_commits_command(url: str) -> str:
    """The repair of a damaged commit file: until it goes, every read of the namespace stops on it."""
    return f"repair: `refine store gc --drop-damaged --grace 0 {url}` (with no extract running), then `refine extract`"


def recompute_command(url: str) -> str:
    """The repair of a damaged entry or dataset manifest: extract reads back what a dataset uses and writes
    its manifest again."""
    return f"repair: `refine extract --images <dir> --annotations <dataset>.json --store {url}` recomputes it"


class Namespace:
    """The features of one encoder identity: committed entries, reads, writers and dataset manifests."""

    def __init__(self, store: FeatureStore, fingerprint: str) -> None:
        self.store = store
        self.fingerprint = fingerprint
        self.files = SegmentFiles(store.fs, store.root, store.local, store.zarr_store, fingerprint)
        # What the last `scan` made of the compacted index: "used", "absent", "stale: ..." or "damaged: ...".
        self.index_status = "not read"

    @classmethod
    def open(cls, store: FeatureStore, fingerprint: str) -> Namespace:
        """The store's namespace of an encoder fingerprint; one it does not hold is a RefineError."""
        if fingerprint not in store.fingerprints():
            known = ", ".join(store.fingerprints()) or "none"
            raise RefineError(f"{store.url}: no features for encoder fingerprint {fingerprint} (store has: {known})")
        return cls(store, fingerprint)

    @classmethod
    def ensure(cls, store: FeatureStore, provenance: dict) -> Namespace:
        """The namespace for an encoder identity, created with its provenance on first use."""
        fingerprint = provenance["fingerprint"]
        relative = f"{fingerprint}/zarr.json"
        attributes = {"provenance": {**provenance, "created": now()}}
        metadata = {"zarr_format": 3, "node_type": "group", "attributes": attributes}
        if not store.write_json_atomic(relative, metadata, exclusive=True):
            existing = store.read_json(relative).get("attributes", {}).get("provenance", {})
            if existing.get("fingerprint") != fingerprint:
                raise RefineError(f"{store.url}: namespace {fingerprint} holds provenance of another encoder")
        return cls(store, fingerprint)

    @property
    def provenance(self) -> dict:
        return self.store.read_json(f"{self.fingerprint}/zarr.json").get("attributes", {}).get("provenance", {})

    def commit_names(self) -> list[str]:
        return [n[: -len(".json")] for n in self.store.list_names(f"{self.fingerprint}/commits") if n.endswith(".json")]

    def read_commit(self, segment: str) -> CommitFile:
        """One segment's commit file; a damaged one is a RefineError naming it (FileNotFoundError if gone)."""
        relative = commit_path(self.fingerprint, segment)
        return CommitFile.parse(self.store.read_json(relative), segment, f"{self.store.url}: {relative}")

    def write_commit(self, commit: CommitFile) -> None:
        """Replace a segment's commit file atomically: readers see the old rows or the new ones."""
        self.store.write_json_atomic(commit_path(self.fingerprint, commit.segment), commit.to_json())

    def commit_entries(self, segment: str) -> list[Entry]:
        """The committed rows of one segment; a damaged commit file is a RefineError naming it."""
        return self.read_commit(segment).entries()

    def commit_stamps(self) -> dict[str, list[Any]]:
        """Segment -> stamp (size, time, inode or ETag) of every commit file, from one listing."""
        try:
            listing = self.store.fs.ls(self.store.path(self.fingerprint, "commits"), detail=True)
        except FileNotFoundError:
            return {}
        names = {os.path.basename(info["name"].rstrip("/")): info for info in listing}
        return {name[: -len(".json")]: file_stamp(info) for name, info in names.items() if name.endswith(".json")}

    def scan(self) -> tuple[EntryIndex, list[str]]:
        """Every committed entry by key, and one message per damaged commit file (its entries left out).

        Where one key was committed in several segments, the latest segment's copy wins (see the module).
        The compacted index (`pipeline.store.index`) stands in for the commit files it covers while they
        are unchanged.
        """
        index, damaged, _ = self._scan()
        return index, damaged

    def _scan(self) -> tuple[EntryIndex, list[str], dict[str, list[Any]]]:
        """`scan`, and the stamps of the commit files whose rows the index holds."""
        stamps = self.commit_stamps()  # before any read: a file replaced after it is stale, never wrongly fresh
        compact, covered = self._compact_index(stamps)
        parts = [compact.rows] if compact is not None else []
        damaged: list[str] = []
        for segment in sorted(set(stamps) - set(covered)):
            try:
                parts.append(self.read_commit(segment).columns())
                covered[segment] = stamps[segment]
            except FileNotFoundError:
                continue  # removed by `store gc` between listing and reading
            except RefineError as error:
                damaged.append(f"{error}; {drop_damaged_commits_command(self.store.url)}")
        if compact is not None and len(parts) == 1:
            return compact, damaged, covered
        return EntryIndex.resolve(parts), damaged, covered

    def _compact_index(self, stamps: dict[str, list[Any]]) -> tuple[EntryIndex | None, dict[str, list[Any]]]:
        """The compacted index and what it covers, if it is intact and every commit file it covers unchanged."""
        try:
            data = self.store.fs.cat_file(self.store.path(self.fingerprint, INDEX_FILE))
        except FileNotFoundError:
            self.index_status = "absent"
            return None, {}
        except OSError as error:
            self.index_status = f"damaged: unreadable ({error.strerror or error})"
            return None, {}
        try:
            compact, covered = EntryIndex.from_bytes(data)
        except ValueError as error:
            self.index_status = f"damaged: {error}"
            return None, {}
        changed = sorted(segment for segment, stamp in covered.items() if stamps.get(segment) != stamp)
        if changed:
            self.index_status = f"stale: {len(changed)} commit file(s) it covers changed or went (e.g. {changed[0]})"
            return None, {}
        self.index_status = "used"
        return compact, dict(covered)

    def write_index(self) -> int:
        """Write the compacted index of every commit file now listed (atomically); returns its entries."""
        index, _, covered = self._scan()
        self.store.write_bytes_atomic(f"{self.fingerprint}/{INDEX_FILE}", index.to_bytes(covered))
        return len(index)

    def entries(self) -> EntryIndex:
        """Every committed entry by key; a damaged commit file is a RefineError naming it."""
        index, damaged = self.scan()
        if damaged:
            raise RefineError(damaged[0])
        return index

    def read(self, entry: Entry, *, check: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """The embedding (256 x 64 x 64) and early feature (C x 64 x 64) of one entry, float16, read-only.

        With `check`, the bytes must match the digest recorded at commit time (in layout 3 the plane is read
        too: the digest covers it). The writer refused non-finite features, so a matching entry is finite;
        a mismatching one is checked for NaN / inf only to say so.
        """
        embedding, early, _ = self._read(entry, check, with_plane=check)
        return embedding, early

    def read_with_plane(self, entry: Entry, *, check: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`read`, and the entry's stride-4 plane (3 x 256 x 256 uint8); an entry of a layout without
        planes is a RefineError that names the command that adds them."""
        if not LAYOUTS[entry.layout].has_plane:
            raise RefineError(
                f"{self.store.url}: entry {entry.key} has no stride-4 plane (written by an older refine, layout "
                f"{entry.layout}); {recompute_command(self.store.url)}"
            )
        embedding, early, plane = self._read(entry, check, with_plane=True)
        assert plane is not None
        return embedding, early, plane

    def read_inputs(
        self, entry: Entry, *, with_plane: bool, check: bool = False
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """What a refiner reads of an entry: `read`, and with `with_plane` the plane (`read_with_plane`)."""
        if with_plane:
            return self.read_with_plane(entry, check=check)
        embedding, early = self.read(entry, check=check)
        return embedding, early, None

    def read_stored(self, entry: Entry, *, check: bool = False) -> tuple[np.ndarray, ...]:
        """Everything its layout stores of an entry: the embedding, the early feature and, where the layout
        holds one, the plane (what `store verify` checks)."""
        if LAYOUTS[entry.layout].has_plane:
            return self.read_with_plane(entry, check=check)
        return self.read(entry, check=check)

    def _read(self, entry: Entry, check: bool, with_plane: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        where = f"{self.store.url}: entry {entry.key} (segment {entry.segment}, row {entry.row})"
        layout = LAYOUTS[entry.layout]
        try:
            embedding, early, plane = layout.read(self.files, entry, with_plane)
        except FileNotFoundError:
            raise RefineError(f"{where} cannot be read: its shard file is missing") from None
        except Exception as error:  # zarr raises codec, key and value errors alike on damaged data
            raise RefineError(f"{where} cannot be read: {type(error).__name__}: {str(error)[:160]}") from None
        if check and layout.digest(embedding, early, plane) != entry.digest:
            if not (all_finite(embedding) and all_finite(early)):
                raise RefineError(f"{where} holds NaN or infinite features and does not match its recorded digest")
            raise RefineError(f"{where} does not match its recorded digest")
        return embedding, early, plane

    def read_through_zarr(self, entry: Entry) -> tuple[np.ndarray, ...]:
        """An entry as any zarr reader sees it (shard index, codecs), unchecked: layout 1's read path, and
        `store verify`'s proof that a mapped entry's recorded offsets agree with zarr's own index. Every
        array its layout stores (the embedding, the early feature and, in layout 3, the plane)."""
        return tuple(self.files.zarr_row(entry, name) for name in LAYOUTS[entry.layout].arrays)

    # -- datasets ----------------------------------------------------------------------------------
    def dataset_names(self) -> list[str]:
        names = self.store.list_names(f"{self.fingerprint}/datasets")
        return [n[: -len(".json")] for n in names if n.endswith(".json")]

    def manifest(self, name: str) -> dict:
        """The manifest of dataset `name` (an object; `pipeline.manifest.manifest_images` reads its images)."""
        relative = f"{self.fingerprint}/datasets/{name}.json"
        try:
            manifest = self.store.read_json(relative)
            if not isinstance(manifest, dict):
                raise RefineError(f"{self.store.url}: {relative} is damaged (not a JSON object)")
            return manifest
        except RefineError as error:
            raise RefineError(f"{error}; {recompute_command(self.store.url)}") from None
        except FileNotFoundError:
            known = ", ".join(self.dataset_names()) or "none"
            raise RefineError(
                f"{self.store.url}: no dataset {name!r} for encoder {self.fingerprint} (known: {known})"
            ) from None

    def write_manifest(self, manifest: dict) -> None:
        self.store.write_json_atomic(f"{self.fingerprint}/datasets/{manifest['dataset']}.json", manifest)
