"""The refiner variants by name, one line each: the module that defines the variant and its class.

The class is imported when a refiner is built, so the CLI lists the names without loading torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.model.base import Refiner, RefinerConfig

REFINERS: dict[str, str] = {
    "similarity_cascade": "pipeline.model.refiner:SimilarityCascadeRefiner",
}


def build_refiner(name: str, config: RefinerConfig) -> Refiner:
    """A refiner variant from `REFINERS` by name, built from its config (untrained)."""
    if name not in REFINERS:
        raise KeyError(f"unknown refiner {name!r}; choose one of {', '.join(REFINERS)}")
    module, _, cls = REFINERS[name].partition(":")
    return getattr(importlib.import_module(module), cls)(config)
