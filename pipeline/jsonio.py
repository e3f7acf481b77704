"""The one atomic JSON writer for local output files (manifest copies, metrics, refined boxes).

Readers (DVC, a user's script, the next stage) see the old file or the new one, never a half-written one:
the text goes to a temporary file next to the target, is flushed to disk, then renamed over the target.
Files inside the feature store go through `FeatureStore.write_json_atomic`, which also handles remote stores.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

from pipeline.errors import RefineError


def write_json(
    path: Path,
    value: Any,
    *,
    indent: int = 1,
    sort_keys: bool = False,
    allow_nan: bool = True,
    what: str = "",
) -> None:
    """Write `value` as JSON (plus a final newline) to `path` atomically, creating its folder.

    A failed write leaves the earlier file intact and no temporary behind, and raises a one-line
    RefineError naming the file (`what` says what it is, e.g. "the manifest").
    """
    data = (json.dumps(value, indent=indent, sort_keys=sort_keys, allow_nan=allow_nan) + "\n").encode()
    # A name of its own: two processes writing the same target never share a temporary.
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}.partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(temporary, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())  # the rename must not reach the disk before the content does
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)
    except OSError as error:
        raise RefineError(f"{path}: cannot write{f' {what}' if what else ''} ({error.strerror or error})") from None
