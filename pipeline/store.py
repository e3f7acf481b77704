"""The content-addressed feature store: Zarr v3, one namespace per encoder, immutable sharded segments.

Layout under the store root (a local path or an fsspec URL)::

    zarr.json                              root group, attributes mark the format and its version
    <fingerprint>/zarr.json                one namespace per encoder identity, provenance in attributes
    <fingerprint>/segments/<segment>/      one writer's arrays, never shared with another writer:
        embedding                          rows x 256 x 64 x 64 float16, one chunk per row, sharded
        early                              rows x C x 64 x 64 float16
        plane                              rows x 3 x 256 x 256 uint8 (layout 3: the stride-4 image plane)
    <fingerprint>/commits/<segment>.json   the committed rows of that segment (key, row, sizes, digest, and
                                           where each chunk starts), and the segment's layout
    <fingerprint>/datasets/<name>.json     per-dataset manifest: image id / file name -> key, sizes
    <fingerprint>/index.npz                a cache of the commit files, used only while they are unchanged
                                           (see `pipeline.store_index`)

Why it is crash-safe and safe with several writers: a writer owns its segment and writes each batch as
whole, fresh shards; only then does it replace its commit file (atomically). Readers see exactly the rows
named in commit files, so a killed writer leaves at most unreferenced bytes behind, never a visible
partial entry, and two writers never write the same file.

One key, one entry: two writers that encode the same image at the same moment both commit it (there is
no lock to prevent it). Every reader resolves a key to the copy in the *latest* segment (segment names
are time-ordered), so all readers agree; `refine store gc` later drops the other copies. Latest-wins is
also how a damaged entry is repaired: `extract` recomputes it into a fresh, later segment.

The writer is `pipeline.store_writer`; how an entry's bytes lie in its shards and how a read checks them
is `pipeline.segment_layout`; the index of the committed entries is `pipeline.store_index`. The root's
marker gives the newest segment layout the store may hold: version 2 the first with segments of layout 2,
version 3 the first with layout 3. An older store is read as it is and marked by its first new segment, so
that an older refine refuses it in one line instead of misreading it.
"""

from __future__ import annotations

import json
import os
import secrets
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import orjson
import zarr
from fsspec.implementations.local import LocalFileSystem

from pipeline.errors import RefineError
from pipeline.jsonio import replace_atomically
from pipeline.shapes import EMBEDDING_SHAPE, PLANE_SHAPE
from pipeline.store_index import INDEX_FILE, Entry, EntryIndex, file_stamp, parse_commit
from pipeline.segment_layout import (
    CURRENT_LAYOUT,
    LEGACY_LAYOUT,
    PLANE_LAYOUT,
    RAW_LAYOUT,
    legacy_digest,
    plane_offset,
    raw_digest,
    read_chunk,
    shard_file,
)

STORE_FORMAT = "refine-feature-store"
STORE_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
EMBEDDING = "embedding"
EARLY = "early"
PLANE = "plane"
PLANE_BYTES = int(np.prod(PLANE_SHAPE))
# fsspec options of every store file system. Credentials and the endpoint come from the environment
# (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, AWS_ENDPOINT_URL for an S3-compatible
# server: botocore reads them itself).
STORAGE_OPTIONS: dict[str, Any] = {"use_listings_cache": False}


def entry_digest(
    embedding: np.ndarray, early: np.ndarray, plane: np.ndarray | None = None, layout: int = CURRENT_LAYOUT
) -> str:
    """The digest an entry of `layout` records for these features (and, in layout 3, its plane)."""
    if layout == LEGACY_LAYOUT:
        return legacy_digest(embedding, early)
    return raw_digest(embedding, early, plane if layout == PLANE_LAYOUT else None)


def drop_damaged_commits_command(url: str) -> str:
    """The repair of a damaged commit file: until it goes, every read of the namespace stops on it."""
    return f"repair: `refine store gc --drop-damaged --grace 0 {url}` (with no extract running), then `refine extract`"


def recompute_command(url: str) -> str:
    """The repair of a damaged entry or dataset manifest: extract reads back what a dataset uses and writes
    its manifest again."""
    return f"repair: `refine extract --images <dir> --annotations <dataset>.json --store {url}` recomputes it"


def all_finite(array: np.ndarray) -> bool:
    """No NaN or inf in the array. For float16 it tests the exponent bits: numpy's isfinite converts float16
    element by element in software and costs about twice as long as the whole zarr write of a batch."""
    if array.dtype != np.float16:
        return bool(np.isfinite(array).all())
    return not ((np.ascontiguousarray(array).view(np.uint16) & 0x7C00) == 0x7C00).any()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class FeatureStore:
    """A feature store at a local path or fsspec URL (`s3://...`, `memory://...`, `file://...`)."""

    def __init__(self, url: str | Path, *, create: bool = False) -> None:
        self.url = str(url)
        # No cached listings: other processes and machines (the ranks of a distributed run) commit into the
        # same store, and a cached listing would hide their commits from `scan` for the process's lifetime.
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **STORAGE_OPTIONS)
        self.root = self.root.rstrip("/")
        self.local = isinstance(self.fs, LocalFileSystem)
        self._check_or_create(create)
        self.zarr_store = (
            zarr.storage.LocalStore(self.root)
            if self.local
            else zarr.storage.FsspecStore.from_url(self.url, storage_options=STORAGE_OPTIONS)
        )

    # -- files -------------------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return "/".join((self.root, *parts))

    def read_json(self, relative: str) -> Any:
        try:
            with self.fs.open(self.path(relative), "rb") as f:
                return orjson.loads(f.read())  # ~3 x json's speed: a million-image store has ~300 MB of it
        except FileNotFoundError:
            raise
        except orjson.JSONDecodeError as error:
            raise RefineError(f"{self.url}: {relative} is damaged ({error})") from None

    def write_json_atomic(self, relative: str, value: Any, *, exclusive: bool = False) -> bool:
        """Replace a small JSON file atomically (see `write_bytes_atomic`)."""
        return self.write_bytes_atomic(
            relative, json.dumps(value, indent=1, sort_keys=True).encode() + b"\n", exclusive=exclusive
        )

    def write_bytes_atomic(self, relative: str, data: bytes, *, exclusive: bool = False) -> bool:
        """Replace a file so that readers see the old or the new content, never a mix.

        With `exclusive`, only create it: returns False (and writes nothing) if it already exists.
        """
        target = self.path(relative)
        if not self.local:
            try:
                # An object-store PUT is atomic; "create" is a conditional PUT (If-None-Match), so of two
                # writers creating the same file at once exactly one succeeds.
                self.fs.pipe_file(target, data, mode="create" if exclusive else "overwrite")
                return True
            except FileExistsError:
                return False
            except OSError as error:
                raise RefineError(f"{self.url}: cannot write {relative} ({error.strerror or error})") from None
        temporary = Path(f"{target}.{secrets.token_hex(6)}.partial")
        try:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            return replace_atomically(Path(target), temporary, data, exclusive=exclusive)
        except OSError as error:  # a full disk, a read-only store: the old content stays as it was
            raise RefineError(f"{self.url}: cannot write {relative} ({error.strerror or error})") from None

    def list_names(self, relative: str) -> list[str]:
        try:
            listing = self.fs.ls(self.path(relative), detail=False)
        except FileNotFoundError:
            return []
        return sorted(os.path.basename(p.rstrip("/")) for p in listing)

    def bytes_on_disk(self, relative: str = "") -> int:
        target = self.path(relative) if relative else self.root
        try:
            return int(self.fs.du(target, total=True))
        except FileNotFoundError:
            return 0

    # -- format ------------------------------------------------------------------------------------
    def _check_or_create(self, create: bool) -> None:
        try:
            exists = self.fs.exists(self.root)
            if exists and not self.fs.isdir(self.root):
                raise RefineError(f"{self.url}: is a file, not a feature store")
            # One listing decides: another writer may be creating the store right now (its zarr.json appears
            # between two looks, and before that only its temporary `zarr.json.*.partial` is there).
            names = set(self.list_names("")) if exists else set()
            if "zarr.json" in names:
                self._check_format(self.read_json("zarr.json"))
                return
            if names & {".zgroup", ".zarray"}:
                raise RefineError(f"{self.url}: is a Zarr v2 store, not a refine feature store (Zarr v3)")
            if [name for name in names if not name.endswith(".partial")]:
                raise RefineError(f"{self.url}: exists and is not a refine feature store (no zarr.json)")
            if not create:
                raise RefineError(f"{self.url}: no feature store here; run `refine extract` first")
            self.fs.makedirs(self.root, exist_ok=True)
            attributes = {"refine": {"format": STORE_FORMAT, "version": STORE_VERSION, "created": _now()}}
            metadata = {"zarr_format": 3, "node_type": "group", "attributes": attributes}
            self.version = STORE_VERSION
            if not self.write_json_atomic("zarr.json", metadata, exclusive=True):
                self._check_format(self.read_json("zarr.json"))  # another writer created it first
        except OSError as error:
            raise RefineError(f"{self.url}: cannot open the feature store ({error.strerror or error})") from None
        except RefineError:
            raise
        except Exception as error:  # a remote store's client raises its own errors (no endpoint, no credentials)
            raise RefineError(f"{self.url}: cannot open the feature store ({type(error).__name__}: {error})") from None

    def _check_format(self, metadata: Any) -> None:
        refine = metadata.get("attributes", {}).get("refine") if isinstance(metadata, dict) else None
        if not isinstance(refine, dict) or refine.get("format") != STORE_FORMAT:
            raise RefineError(f"{self.url}: is a Zarr store of another format, not a refine feature store")
        if refine.get("version") not in READABLE_VERSIONS:
            raise RefineError(
                f"{self.url}: feature store version {refine.get('version')} is not supported "
                f"(this refine reads versions {', '.join(map(str, READABLE_VERSIONS))}); use the refine that wrote it"
            )
        self.version = int(refine["version"])

    def mark_current_version(self) -> None:
        """Before the first segment of the current layout: raise the root's version, so that a refine that
        cannot read that layout refuses the store in one line instead of calling every new entry damaged."""
        if self.version == STORE_VERSION:
            return
        metadata = self.read_json("zarr.json")
        metadata["attributes"]["refine"].update(version=STORE_VERSION, upgraded=_now())
        self.write_json_atomic("zarr.json", metadata)
        self.version = STORE_VERSION

    # -- namespaces --------------------------------------------------------------------------------
    def fingerprints(self) -> list[str]:
        return [name for name in self.list_names("") if self.fs.exists(self.path(name, "zarr.json"))]

    def namespace(self, fingerprint: str) -> Namespace:
        if fingerprint not in self.fingerprints():
            known = ", ".join(self.fingerprints()) or "none"
            raise RefineError(f"{self.url}: no features for encoder fingerprint {fingerprint} (store has: {known})")
        return Namespace(self, fingerprint)

    def ensure_namespace(self, provenance: dict) -> Namespace:
        """The namespace for an encoder identity, created with its provenance on first use."""
        fingerprint = provenance["fingerprint"]
        relative = f"{fingerprint}/zarr.json"
        attributes = {"provenance": {**provenance, "created": _now()}}
        metadata = {"zarr_format": 3, "node_type": "group", "attributes": attributes}
        if not self.write_json_atomic(relative, metadata, exclusive=True):
            existing = self.read_json(relative).get("attributes", {}).get("provenance", {})
            if existing.get("fingerprint") != fingerprint:
                raise RefineError(f"{self.url}: namespace {fingerprint} holds provenance of another encoder")
        return Namespace(self, fingerprint)


class Namespace:
    """The features of one encoder identity: committed entries, reads, writers and dataset manifests."""

    def __init__(self, store: FeatureStore, fingerprint: str) -> None:
        self.store = store
        self.fingerprint = fingerprint
        self._arrays: dict[tuple[str, str], zarr.Array] = {}
        # What the last `scan` made of the compacted index: "used", "absent", "stale: ..." or "damaged: ...".
        self.index_status = "not read"

    @property
    def provenance(self) -> dict:
        return self.store.read_json(f"{self.fingerprint}/zarr.json").get("attributes", {}).get("provenance", {})

    def commit_names(self) -> list[str]:
        return [n[: -len(".json")] for n in self.store.list_names(f"{self.fingerprint}/commits") if n.endswith(".json")]

    def read_commit(self, segment: str) -> dict:
        return self.store.read_json(f"{self.fingerprint}/commits/{segment}.json")

    def commit_entries(self, segment: str) -> list[Entry]:
        """The committed rows of one segment; a damaged commit file is a RefineError naming it."""
        relative = f"{self.fingerprint}/commits/{segment}.json"
        commit = self.store.read_json(relative)
        try:
            layout = int(commit.get("layout", LEGACY_LAYOUT))
            if layout == LEGACY_LAYOUT:
                return [
                    Entry(str(key), segment, int(row), (int(oh), int(ow)), (int(rh), int(rw)), str(digest))
                    for key, row, oh, ow, rh, rw, digest in commit["entries"]
                ]
            if layout not in (RAW_LAYOUT, PLANE_LAYOUT):
                raise RefineError(
                    f"{self.store.url}: {relative} has layout {layout}, which this refine cannot read; use a newer one"
                )
            shard_rows, channels = int(commit["shard_rows"]), int(commit["early_channels"])
            # One tuple per distinct size and offset pair, shared by the rows that have it: a dataset has
            # few distinct image sizes and a shard only `shard_rows` offsets, and a million rows add up.
            shared: dict[tuple[int, int], tuple[int, int]] = {}
            return [
                Entry(
                    str(key),
                    segment,
                    int(row),
                    shared.setdefault((int(oh), int(ow)), (int(oh), int(ow))),
                    shared.setdefault((int(rh), int(rw)), (int(rh), int(rw))),
                    str(digest),
                    layout,
                    shard_rows,
                    channels,
                    shared.setdefault((int(embedding_at), int(early_at)), (int(embedding_at), int(early_at))),
                )
                for key, row, oh, ow, rh, rw, digest, embedding_at, early_at in commit["entries"]
            ]
        except (AttributeError, KeyError, TypeError, ValueError) as error:
            raise RefineError(f"{self.store.url}: {relative} is damaged (bad entries: {error})") from None

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
        The compacted index (`pipeline.store_index`) stands in for the commit files it covers while they
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
            relative = f"{self.fingerprint}/commits/{segment}.json"
            try:
                parts.append(parse_commit(self.store.read_json(relative), segment, f"{self.store.url}: {relative}"))
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

    def _array(self, segment: str, name: str) -> zarr.Array:
        cached = self._arrays.get((segment, name))
        if cached is None:
            path = f"{self.fingerprint}/segments/{segment}/{name}"
            cached = zarr.open_array(self.store.zarr_store, path=path, mode="r")
            self._arrays[(segment, name)] = cached
        return cached

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
        if entry.layout != PLANE_LAYOUT:
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

    def _read(self, entry: Entry, check: bool, with_plane: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        where = f"{self.store.url}: entry {entry.key} (segment {entry.segment}, row {entry.row})"
        try:
            legacy = entry.layout == LEGACY_LAYOUT
            embedding, early = self._read_through_zarr(entry) if legacy else self._read_raw(entry)
            plane = self._read_plane(entry) if with_plane and entry.layout == PLANE_LAYOUT else None
        except FileNotFoundError:
            raise RefineError(f"{where} cannot be read: its shard file is missing") from None
        except Exception as error:  # zarr raises codec, key and value errors alike on damaged data
            raise RefineError(f"{where} cannot be read: {type(error).__name__}: {str(error)[:160]}") from None
        if check and entry_digest(embedding, early, plane, entry.layout) != entry.digest:
            if not (all_finite(embedding) and all_finite(early)):
                raise RefineError(f"{where} holds NaN or infinite features and does not match its recorded digest")
            raise RefineError(f"{where} does not match its recorded digest")
        return embedding, early, plane

    def read_through_zarr(self, entry: Entry) -> tuple[np.ndarray, ...]:
        """An entry as any zarr reader sees it (shard index, codecs), unchecked: layout 1's read path, and
        `store verify`'s proof that a layout-2 or 3 entry's recorded offsets agree with zarr's own index.
        The embedding and early feature, and in layout 3 the plane."""
        features = self._read_through_zarr(entry)
        return (*features, self._read_plane_through_zarr(entry)) if entry.layout == PLANE_LAYOUT else features

    def _read_through_zarr(self, entry: Entry) -> tuple[np.ndarray, np.ndarray]:
        return self._array(entry.segment, EMBEDDING)[entry.row], self._array(entry.segment, EARLY)[entry.row]

    def _read_plane(self, entry: Entry) -> np.ndarray:
        path = self.store.path(shard_file(self.fingerprint, entry.segment, PLANE, entry.row // entry.shard_rows))
        offset = plane_offset(entry.row, entry.shard_rows, PLANE_BYTES)
        return read_chunk(self.store.fs, path, offset, PLANE_BYTES, local=self.store.local).reshape(PLANE_SHAPE)

    def _read_plane_through_zarr(self, entry: Entry) -> np.ndarray:
        return self._array(entry.segment, PLANE)[entry.row]

    def _read_raw(self, entry: Entry) -> tuple[np.ndarray, np.ndarray]:
        shard = entry.row // entry.shard_rows
        arrays = []
        for name, channels, offset in (
            (EMBEDDING, EMBEDDING_SHAPE[0], entry.offsets[0]),
            (EARLY, entry.early_channels, entry.offsets[1]),
        ):
            path = self.store.path(shard_file(self.fingerprint, entry.segment, name, shard))
            shape = (channels, *EMBEDDING_SHAPE[1:])
            chunk = read_chunk(self.store.fs, path, offset, 2 * channels * shape[1] * shape[2], local=self.store.local)
            arrays.append(chunk.view("<f2").reshape(shape))
        return arrays[0], arrays[1]

    # -- datasets ----------------------------------------------------------------------------------
    def dataset_names(self) -> list[str]:
        names = self.store.list_names(f"{self.fingerprint}/datasets")
        return [n[: -len(".json")] for n in names if n.endswith(".json")]

    def dataset(self, name: str) -> dict:
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

    def write_dataset(self, manifest: dict) -> None:
        self.store.write_json_atomic(f"{self.fingerprint}/datasets/{manifest['dataset']}.json", manifest)
