"""Feature cache: encode each sampled clip once with the frozen tower, train the projector from disk.

What is stored is what the projector reads after its parameter-free first step (`Projector.prepare`,
e.g. per-frame pooling): (T, K, Dv) per clip instead of every patch token. The directory name is a hash
of everything that changes those features: the tower's `cache_key` (config and, unless a named
pretrained tag, its weights), the projector's `cache_spec`, and the frame sampling.

Encoding runs on the training device in its compute dtype, in batches, with decoding in DataLoader
workers. Under DDP each rank encodes every world-th missing clip and writes its own shards and its own
index file (`index.r<rank>.json`); readers merge all index files, so no file is written by two ranks.
A killed run keeps what it encoded: shards and index entries are renamed into place as they complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset

from vlm.util.files import atomic_write

log = logging.getLogger(__name__)
STORE_DTYPE = torch.float16  # features only feed the projector; half the bytes to write and read back


def cache_dir(root: str | os.PathLike, key: dict[str, Any]) -> Path:
    return Path(root) / hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def video_key(record: dict[str, Any]) -> str:
    """Identity of a clip: path, window, and file size + mtime so an edited video is re-encoded."""
    st = os.stat(record["video"]) if os.path.exists(record["video"]) else None
    sig = [
        record["rel"],
        record["start"],
        record["end"],
        st.st_size if st else None,
        st.st_mtime_ns if st else None,
    ]
    return hashlib.sha256(json.dumps(sig).encode()).hexdigest()[:24]


def load_index(directory: Path) -> dict[str, dict[str, Any]]:
    """{"features": {key: shard}, "failed": {key: reason}} merged over every rank's index file."""
    merged: dict[str, dict[str, Any]] = {"features": {}, "failed": {}}
    for p in sorted(directory.glob("index.r*.json")):
        part = json.loads(p.read_text())
        merged["features"].update(part["features"])
        merged["failed"].update(part["failed"])
    return merged


class _Decode(Dataset):
    """Decodes record i (no stand-in on failure) and reports failures instead of raising."""

    def __init__(self, dataset: Any, indices: list[int]) -> None:
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> dict[str, Any]:
        i = self.indices[k]
        try:
            return {"i": i, "ok": True, "frames": self.dataset.decode(i)}
        except Exception as e:  # a decode error is this clip's, not the cache's (VideoDecodeError and kin)
            return {"i": i, "ok": False, "error": " ".join(str(e).split())}


@torch.no_grad()
def build_cache(
    dataset: Any,
    encode: Callable[[torch.Tensor], torch.Tensor],
    directory: Path,
    *,
    device: torch.device,
    batch_size: int,
    num_workers: int,
    rank: int = 0,
    world: int = 1,
    barrier: Callable[[], None] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Encode this rank's share of the records of `dataset` not yet in `directory`; returns stats.

    `encode`: (B, T, H, W, 3) uint8 on `device` → (B, T, K, Dv) prepared features.
    `barrier` (every rank calls it): under DDP, no rank writes before every rank has read the index,
    so all ranks split the same to-do list (a fast rank's first shards would otherwise shrink a slow
    rank's list, and clips would be encoded twice or never).
    """
    directory.mkdir(parents=True, exist_ok=True)
    index = load_index(directory)
    keys = [video_key(r) for r in dataset.records]
    todo = [i for i, k in enumerate(keys) if k not in index["features"] and k not in index["failed"]]
    mine = todo[rank::world]
    own_path = directory / f"index.r{rank}.json"
    own = json.loads(own_path.read_text()) if own_path.exists() else {"features": {}, "failed": {}}
    if barrier is not None:
        barrier()
    stats = {"encoded": 0, "failed": 0, "cached": len(keys) - len(todo), "seconds": 0.0, "bytes": 0}
    if not mine:
        return stats
    loader = DataLoader(
        _Decode(dataset, mine), batch_size=batch_size, num_workers=num_workers, collate_fn=list,
        prefetch_factor=4 if num_workers else None,  # decode ahead while the tower encodes
    )  # fmt: skip
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(mine), unit="video", desc=f"feature cache (rank {rank})", dynamic_ncols=True)
    t0 = time.perf_counter()
    for items in loader:
        good = [it for it in items if it["ok"]]
        for it in items:
            if not it["ok"]:
                own["failed"][keys[it["i"]]] = it["error"]
                stats["failed"] += 1
        if good:
            frames = torch.stack([it["frames"] for it in good]).to(device)  # (B, T, H, W, 3)
            feats = encode(frames).to(STORE_DTYPE).cpu()  # (B, T, K, Dv)
            name = f"shard-r{rank}-{uuid.uuid4().hex[:12]}.safetensors"
            tmp = directory / f".{name}.tmp"
            save_file({keys[it["i"]]: feats[j].contiguous() for j, it in enumerate(good)}, tmp)
            tmp.replace(directory / name)
            for it in good:
                own["features"][keys[it["i"]]] = name
            stats["encoded"] += len(good)
            stats["bytes"] += feats.numel() * feats.element_size()
        atomic_write(own_path, json.dumps(own))  # after every shard: a killed run keeps what it encoded
        if bar is not None:
            bar.update(len(items))
    if bar is not None:
        bar.close()
    stats["seconds"] = time.perf_counter() - t0
    return stats


class CachedFeatureDataset(Dataset):
    """Items like `VideoCaptionDataset`'s but with "feats" (T, K, Dv), the projector's prepared tokens."""

    def __init__(self, records: list[dict[str, Any]], directory: Path) -> None:
        feats = load_index(directory)["features"]
        self.directory = directory
        keys = [video_key(r) for r in records]  # one stat() per clip
        self.items = [(r, feats[k], k) for r, k in zip(records, keys, strict=True) if k in feats]
        skipped = len(records) - len(self.items)
        if skipped:
            log.warning(
                "feature cache %s: %d of %d videos failed to decode and are skipped",
                directory,
                skipped,
                len(records),
            )
        if not self.items:
            raise RuntimeError(f"feature cache {directory} holds none of the {len(records)} videos")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        rec, shard, key = self.items[i]
        with safe_open(str(self.directory / shard), framework="pt") as f:
            feats = f.get_tensor(key)
        item = {"feats": feats, "captions": rec["captions"], "video": rec["rel"]}
        if "attributes" in rec:
            item["attributes"] = rec["attributes"]
        return item


class CacheFeatures(L.Callback):
    """At setup: build the cache on the training device in the run's compute dtype, swap the datamodule's
    datasets for cached ones, and release the frozen tower (training then reads features only)."""

    def __init__(
        self, root: Path, sampling: dict[str, Any], batch_size: int, num_workers: int, progress: bool
    ) -> None:
        self.root, self.sampling = root, sampling
        self.batch_size, self.num_workers, self.progress = batch_size, num_workers, progress
        self.directory: Path | None = None
        self.stats: dict[str, Any] = {"encoded": 0, "failed": 0, "cached": 0, "seconds": 0.0, "bytes": 0}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or pl_module.vlm.vision is None:
            return
        dm, vlm = trainer.datamodule, pl_module.vlm
        tower, projector = vlm.vision, vlm.projector
        key = {
            "tower": tower.cache_key,
            "prepare": projector.cache_spec(),
            "sampling": self.sampling,
            "tag": getattr(dm.train_set, "cache_tag", None),  # e.g. the demo's blind control
        }
        self.directory = cache_dir(self.root, key)
        device = trainer.strategy.root_device
        compute = _compute_dtype(trainer.precision)
        tower.to(device)
        if compute is not None:
            tower.to(compute)

        def encode(frames: torch.Tensor) -> torch.Tensor:  # (B, T, H, W, 3) → (B, T, K, Dv)
            return projector.prepare(tower(frames).float())

        for ds in (dm.train_set, dm.val_set):
            if ds is None:
                continue
            st = build_cache(
                ds, encode, self.directory, device=device, batch_size=self.batch_size,
                num_workers=self.num_workers, rank=trainer.global_rank, world=trainer.world_size,
                barrier=lambda: trainer.strategy.barrier("feature-cache-index"), progress=self.progress and trainer.is_global_zero,
            )  # fmt: skip
            for k, v in st.items():
                self.stats[k] += v
        trainer.strategy.barrier("feature-cache")  # every rank's shards are in place
        dm.train_set = CachedFeatureDataset(dm.train_set.records, self.directory)
        if dm.val_set is not None:
            dm.val_set = CachedFeatureDataset(dm.val_set.records, self.directory)
        vlm.vision = None  # frozen and no longer needed: its memory is returned before training starts
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _compute_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a Lightning precision setting (None: full precision)."""
    if str(precision).startswith("bf16"):
        return torch.bfloat16
    if str(precision).startswith("16"):
        return torch.float16
    return None
