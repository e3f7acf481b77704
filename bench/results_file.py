"""Where and how every bench script writes its figures: indented JSON under the `--out` folder."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any


def slug(name: str) -> str:
    """A device or setting name as a file-name part: "NVIDIA H200" -> "nvidia_h200"."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def write_result(out: Path, name: str, result: dict[str, Any]) -> Path:
    """Write `result` to `<out>/<name>.json` (creating `out`); scripts call it again as figures come in."""
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"{name}.json"
    target.write_text(json.dumps(result, indent=1) + "\n")
    return target


def write_and_show(out: Path, name: str, result: dict[str, Any]) -> None:
    """A bench's final figures: written as by `write_result`, then printed with where they went."""
    target = write_result(out, name, result)
    print(json.dumps(result, indent=1))
    print(f"written to {target}")


def peak_rss_mib() -> float:
    """This process's peak resident memory (Linux VmHWM). Not `ru_maxrss`: that survives exec, so a child
    started by a process that once held more memory reports the parent's peak."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")
