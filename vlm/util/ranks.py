"""Splitting work across ranks without padding: rank r takes items r, r+world, r+2·world, ..."""

from __future__ import annotations

from collections.abc import Iterator

import torch.distributed as dist
from torch.utils.data import Sampler


def rank_and_world() -> tuple[int, int]:
    return (
        (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    )


class RankSlice(Sampler):
    """Indices rank, rank+world, ... of a dataset: an even split without DistributedSampler's padding,
    so no item is seen twice (and a rank may get one fewer item)."""

    def __init__(self, n: int, rank: int, world: int) -> None:
        self.idx = list(range(rank, n, world))

    def __iter__(self) -> Iterator[int]:
        return iter(self.idx)

    def __len__(self) -> int:
        return len(self.idx)
