"""Training data: a resumable endless sampler, caption choice, the collator (text via the processor, in
DataLoader workers), and the LightningDataModule."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import Any

import lightning.pytorch as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from vlm.model.processor import Processor
from vlm.util.ranks import RankSlice, rank_and_world


class StepSampler(Sampler):
    """Endless stream of (index, position) from successive seeded permutations.

    Position p of the global stream depends only on (seed, p), so a run resumed at step s with
    `start = s * batch * accumulate` sees exactly the samples the uninterrupted run would have seen.
    Under DDP each rank takes every world-th position of the same stream: no overlap, no gap.
    """

    def __init__(self, n: int, seed: int = 0, start: int = 0) -> None:
        self.n, self.seed, self.start = n, seed, start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        rank, world = rank_and_world()
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


class Collator:
    """Items → a batch: frames (B, T, H, W, 3) uint8 or cached features (B, T, K, Dv), and the token ids,
    mask and labels the processor makes for each item's caption (training: the picked one; validation:
    the first reference). Runs in DataLoader workers, so tokenization stays off the training loop."""

    def __init__(self, processor: Processor, num_tokens: Callable[[int], int]) -> None:
        self.processor, self.num_tokens = processor, num_tokens

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        key = "feats" if "feats" in items[0] else "frames"
        x = torch.stack([it[key] for it in items])
        captions = [it["caption"] if "caption" in it else it["captions"][0] for it in items]
        text = self.processor.train_batch(captions, self.num_tokens(x.shape[1]))
        out: dict[str, Any] = {
            key: x,
            "prepared": key == "feats",  # cached features are the projector's prepared (pooled) tokens
            "input_ids": text.input_ids,
            "attention_mask": text.attention_mask,
            "labels": text.labels,
            "video": [it["video"] for it in items],
            "captions": [it["captions"] for it in items],
        }
        if all("attributes" in it for it in items):
            out["attributes"] = [it["attributes"] for it in items]
        return out


class CaptionDataModule(L.LightningDataModule):
    def __init__(
        self,
        train: Dataset,
        val: Dataset | None,
        collate: Collator,
        batch_size: int,
        num_workers: int,
        seed: int,
        start: int,
    ) -> None:
        super().__init__()
        self.train_set, self.val_set, self.collate = train, val, collate
        self.batch_size, self.num_workers, self.seed, self.start = batch_size, num_workers, seed, start

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            PickCaption(self.train_set, self.seed),
            batch_size=self.batch_size,
            sampler=StepSampler(len(self.train_set), self.seed, self.start),
            num_workers=self.num_workers,
            collate_fn=self.collate,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader | list:
        if self.val_set is None:
            return []
        rank, world = rank_and_world()
        return DataLoader(
            self.val_set,
            batch_size=self.batch_size,
            sampler=RankSlice(len(self.val_set), rank, world),  # each rank validates its own share
            num_workers=self.num_workers,
            collate_fn=self.collate,
        )
