"""Data for training: a resumable endless sampler, caption choice, and the LightningDataModule."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as L
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler


class StepSampler(Sampler):
    """Endless stream of (index, position) from successive seeded permutations.

    Position p of the global stream depends only on (seed, p), so a run resumed at step s with
    `start = s * batch * accumulate` sees exactly the samples the uninterrupted run would have seen.
    Under DDP each rank takes every world-th position of the same stream: no overlap, no gap.
    """

    def __init__(self, n: int, seed: int = 0, start: int = 0) -> None:
        self.n, self.seed, self.start = n, seed, start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        pos = self.start * world + rank  # start counts this rank's samples
        while True:
            epoch, k = divmod(pos, self.n)
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))
            while k < self.n:
                yield int(perm[k]), pos
                pos += world
                k += world
            # pos has crossed into the next epoch; recompute its permutation


class PickCaption(Dataset):
    """Wraps a video dataset; item (i, pos) gets one of video i's captions, chosen by (seed, pos)."""

    def __init__(self, dataset: Dataset, seed: int = 0) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        i, pos = key
        item = dict(self.dataset[i])
        item["caption"] = random.Random(self.seed * 1_000_003 + pos).choice(item["captions"])
        return item


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack frames (B,T,H,W,3) or cached feats (B,T,P,Dv); keep text fields as lists."""
    out: dict[str, Any] = {}
    for key in ("frames", "feats"):
        if key in items[0]:
            out[key] = torch.stack([it[key] for it in items])
    for key in ("caption", "captions", "video", "attributes"):
        if all(key in it for it in items):
            out[key] = [it[key] for it in items]
    return out


class CaptionDataModule(L.LightningDataModule):
    def __init__(
        self,
        train: Dataset,
        val: Dataset | None,
        batch_size: int,
        num_workers: int = 0,
        seed: int = 0,
        start: int = 0,
        val_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        self.train_set, self.val_set = train, val
        self.batch_size, self.num_workers, self.seed, self.start = batch_size, num_workers, seed, start
        self.val_batch_size = val_batch_size or batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            PickCaption(self.train_set, self.seed),
            batch_size=self.batch_size,
            sampler=StepSampler(len(self.train_set), self.seed, self.start),
            num_workers=self.num_workers,
            collate_fn=collate,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader | list:
        if self.val_set is None:
            return []
        return DataLoader(
            self.val_set,
            batch_size=self.val_batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=collate,
        )
