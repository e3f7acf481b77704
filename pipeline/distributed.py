"""Running under `torchrun`: ranks from the environment, one process group, and the few collectives we use.

Without torchrun (no WORLD_SIZE > 1 in the environment) every helper answers for a single process and no
process group is ever created, so `extract` and `train` behave exactly as before.

Only Python objects and small tensors cross ranks here (counters, failures, IoUs, a checkpoint); the
heavy data goes through the shared feature store, never through the process group.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def launched() -> bool:
    """True in a process that torchrun started as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (also before the process group is joined)."""
    if active():
        return dist.get_rank()
    return int(os.environ["RANK"]) if launched() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def local_rank() -> int:
    """This process's index on its machine (which GPU it drives)."""
    return int(os.environ.get("LOCAL_RANK", "0")) if launched() else 0


def local_world_size() -> int:
    """How many ranks run on this machine (and share its cores)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if launched() else 1


def is_main() -> bool:
    """The one rank that writes shared outputs (manifests, checkpoints, metrics) and prints summaries."""
    return rank() == 0


@contextmanager
def process_group(backend: str, timeout: timedelta | None = None) -> Iterator[None]:
    """Join the process group torchrun describes (if any) for the duration of one command.

    backend: "gloo" (CPU tensors and objects) or "nccl" (CUDA tensors). On CUDA each rank first binds
    its own GPU, so that streams, events and NCCL all use it.
    """
    if not launched() or active():
        yield
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
    options = {"timeout": timeout} if timeout is not None else {}
    dist.init_process_group(backend=backend, **options)
    try:
        yield
    finally:
        dist.destroy_process_group()


def barrier() -> None:
    if active():
        dist.barrier()


@dataclass(frozen=True)
class Share:
    """Which content keys (hex) a rank encodes: a pure function of the content, so a renamed or repeated
    file goes to the same rank, and a re-launch gives every rank the same share. Picklable, for workers."""

    rank: int = 0
    world_size: int = 1

    def __call__(self, key: str) -> bool:
        return int(key, 16) % self.world_size == self.rank


def share() -> Share:
    """This rank's share of the images (all of them without torchrun)."""
    return Share(rank(), world_size())


def all_gather(value: T) -> list[T]:
    """Every rank's `value` (any picklable object), in rank order, on every rank."""
    if not active():
        return [value]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def broadcast(value: T | None) -> T:
    """The main rank's `value` on every rank (the others pass None)."""
    if not active():
        return value  # type: ignore[return-value]
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean(value: torch.Tensor) -> float:
    """The mean of a scalar over all ranks (a NaN on any rank makes it NaN on every rank)."""
    if not active():
        return value.item()
    total = value.detach().double().reshape(1).to(_collective_device())
    dist.all_reduce(total)
    return total.item() / world_size()


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
