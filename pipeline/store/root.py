"""The root of a feature store: its file system (local or fsspec), its format marker and version, and its
namespaces (one per encoder identity). See `pipeline.store` for the layout under the root."""

from __future__ import annotations

import json
import os
import secrets
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import fsspec
import orjson
import zarr
from fsspec.implementations.local import LocalFileSystem

from pipeline.errors import RefineError
from pipeline.jsonio import replace_atomically

STORE_FORMAT = "refine-feature-store"
STORE_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
# fsspec options of every store file system. Credentials and the endpoint come from the environment
# (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, AWS_ENDPOINT_URL for an S3-compatible
# server: botocore reads them itself).
STORAGE_OPTIONS: dict[str, Any] = {"use_listings_cache": False}


def now() -> str:
    """The time a store records (UTC, seconds)."""
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
            attributes = {"refine": {"format": STORE_FORMAT, "version": STORE_VERSION, "created": now()}}
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
        metadata["attributes"]["refine"].update(version=STORE_VERSION, upgraded=now())
        self.write_json_atomic("zarr.json", metadata)
        self.version = STORE_VERSION

    # -- namespaces (`pipeline.store.namespace` opens one) -----------------------------------------
    def fingerprints(self) -> list[str]:
        return [name for name in self.list_names("") if self.fs.exists(self.path(name, "zarr.json"))]
