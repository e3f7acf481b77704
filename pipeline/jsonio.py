"""The one atomic file writer (`replace_atomically`): local output files (checkpoints, manifest copies,
metrics, refined boxes) and the local feature store's files go through it; and the temporary names that
writers of whole folders (the review page) use.

Readers (DVC, a user's script, the next stage) see the old file or the new one, never a half-written one:
the bytes go to a temporary file next to the target, are flushed to disk, then renamed over the target.
A temporary carries the writer's process id, so the next write of the same target removes what a killed
writer left and never a live writer's. Files inside the feature store go through
`FeatureStore.write_json_atomic`: its temporaries are cleared by `refine store gc` instead (another machine
may be writing them), and a remote store's PUT is atomic itself.
"""

from __future__ import annotations

import glob
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

from pipeline.errors import RefineError

PARTIAL = ".partial"


def write_json(
    path: Path,
    value: Any,
    *,
    indent: int = 1,
    sort_keys: bool = False,
    allow_nan: bool = True,
    what: str = "",
) -> None:
    """Write `value` as JSON (plus a final newline) to `path` atomically, creating its folder (see
    `write_bytes`)."""
    data = (json.dumps(value, indent=indent, sort_keys=sort_keys, allow_nan=allow_nan) + "\n").encode()
    write_bytes(path, data, what=what)


def write_bytes(path: Path, data: bytes, *, what: str = "") -> None:
    """Write `data` to `path` atomically, creating its folder.

    A failed write leaves the earlier file intact and no temporary behind, and raises a one-line
    RefineError naming the file (`what` says what it is, e.g. "the manifest").
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        replace_atomically(path, temporary_beside(path), data)
    except OSError as error:
        raise RefineError(f"{path}: cannot write{f' {what}' if what else ''} ({error.strerror or error})") from None


def replace_atomically(target: Path, temporary: Path, data: bytes, *, exclusive: bool = False) -> bool:
    """The one atomic write of a local file: `data` into `temporary`, flushed to disk, renamed over `target`
    (with `exclusive`, linked to it only if it does not exist: returns False then, and writes nothing), then
    the folder flushed so that the rename survives a power cut. The temporary never stays behind; OSError
    propagates for the caller to name its file."""
    try:
        with open(temporary, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())  # the rename must not reach the disk before the content does
        if exclusive:
            try:
                os.link(temporary, target)  # fails if the target exists: the first creator wins
            except FileExistsError:
                return False
        else:
            os.replace(temporary, target)
        _fsync_folder(target.parent)
        return True
    finally:
        temporary.unlink(missing_ok=True)


def _fsync_folder(folder: Path) -> None:
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:  # a platform or file system without folder handles: the rename is as durable as it gets
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass  # some file systems (network mounts) refuse fsync on a folder; the rename itself is done
    finally:
        os.close(descriptor)


def temporary_beside(path: Path) -> Path:
    """A fresh temporary name of this process next to `path` (a file or a folder), after removing the
    temporaries of `path` that writers no longer running left behind (a kill, a power cut)."""
    remove_leftovers(path)
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}{PARTIAL}")


def remove_leftovers(path: Path) -> list[Path]:
    """Remove the temporaries of `path` whose writer is not running on this machine; returns them."""
    removed = []
    for candidate in path.parent.glob(f".{glob.escape(path.name)}.*{PARTIAL}"):
        owner = candidate.name[len(path.name) + 2 : -len(PARTIAL)].split("-")[0]
        if owner.isdigit() and _running(int(owner)):
            continue
        if candidate.is_dir() and not candidate.is_symlink():
            shutil.rmtree(candidate, ignore_errors=True)
        else:
            candidate.unlink(missing_ok=True)
        removed.append(candidate)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
