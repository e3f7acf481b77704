"""The one reader of outside PyTorch files (encoder and refiner checkpoints): any failure is one RefineError.

torch's weights-only unpickler raises whatever its parser trips on for arbitrary bytes (IndexError from an
empty stack, KeyError, struct and zip errors alike): a list of exception types at each call let about one
random file in ten through as a traceback. So the boundary catches every Exception, once, here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pipeline.errors import RefineError


def read_torch_file(path: Path, what: str) -> Any:
    """The object a file saved with `torch.save` holds, read with `weights_only=True` (no pickled code) on
    the CPU; a missing, unreadable or malformed file is a one-line RefineError "<path>: not a readable <what>"."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # see the module docstring: no narrower list holds against arbitrary bytes
        text = str(error).strip()
        reason = f"{type(error).__name__}: {text.splitlines()[0][:200]}" if text else type(error).__name__
        raise RefineError(f"{path}: not a readable {what} ({reason})") from None
