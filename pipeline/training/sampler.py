"""The training shuffle: one permutation per (seed, epoch), shared out among the ranks under torchrun."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from pipeline.boxes import SHUFFLE_STREAM, seeded_generator


class EpochShuffle(Sampler[int]):
    """A permutation drawn from (seed, epoch): the same order for an epoch whether or not the run resumed.

    Under DistributedDataParallel each of `world_size` ranks takes every `world_size`-th image of the one
    permutation (like torch's DistributedSampler), so together they see the same images as one process;
    the permutation is padded by repeating its start so every rank has as many steps as the others.

    Given the same permutation, the shares are exactly `torch.utils.data.DistributedSampler`'s (see
    tests/test_distributed.py); its own shuffle is not used because it seeds with `seed + epoch`, so
    seed 0's second epoch would be seed 1's first; here the permutation comes from `seeded_generator`
    with a stream of its own, apart from the noise draws.
    """

    def __init__(self, size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.size = size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(self.size, generator=seeded_generator(self.seed, SHUFFLE_STREAM, self.epoch, 0)).tolist()
        total = len(self) * self.world_size
        padded = (order * math.ceil(total / max(self.size, 1)))[:total]
        return iter(padded[self.rank :: self.world_size])

    def __len__(self) -> int:
        return math.ceil(self.size / self.world_size)
