"""Frozen-encoder feature cache: encode each sampled video once, train the projector from disk.

The cache directory is named by a hash of the encoder (`VisionEncoder.cache_key`: architecture,
pretrained tag, feature layer, weights for random encoders) and the sampling settings, so changing
either starts a fresh cache instead of reading stale features. Features are written in safetensors
shards as they are produced (each shard renamed into place when complete), with an index that maps
a video's key to its shard; a rerun only encodes what is missing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset

log = logging.getLogger(__name__)


def cache_dir(root: str | os.PathLike, encoder_key: str, sampling: dict[str, Any]) -> Path:
    key = json.dumps({"encoder": encoder_key, "sampling": sampling}, sort_keys=True)
    return Path(root) / hashlib.sha256(key.encode()).hexdigest()[:16]


def video_key(record: dict[str, Any]) -> str:
    """Identity of a clip: path, window, and file size + mtime so an edited video is re-encoded."""
    st = os.stat(record["video"]) if os.path.exists(record["video"]) else None
    sig = [
        record["rel"],
        record.get("start"),
        record.get("end"),
        st.st_size if st else None,
        st.st_mtime_ns if st else None,
    ]
    return hashlib.sha256(json.dumps(sig).encode()).hexdigest()[:24]


def _index_path(d: Path) -> Path:
    return d / "index.json"


def load_index(d: Path) -> dict[str, Any]:
    p = _index_path(d)
    return json.loads(p.read_text()) if p.exists() else {"features": {}, "failed": {}}


def _write_index(d: Path, index: dict[str, Any]) -> None:
    tmp = d / ".index.json.tmp"
    tmp.write_text(json.dumps(index))
    tmp.replace(_index_path(d))


@torch.no_grad()
def build_cache(
    dataset: Dataset,
    encoder: torch.nn.Module,
    directory: Path,
    batch_size: int = 16,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float16,
) -> dict[str, Any]:
    """Encode every record of a `VideoCaptionDataset` not yet in `directory`; returns the index.

    Features are stored in fp16: they only feed the projector, and half the bytes halves the
    time to read them back.
    """
    directory.mkdir(parents=True, exist_ok=True)
    index = load_index(directory)
    keys = [video_key(r) for r in dataset.records]
    todo = [i for i, k in enumerate(keys) if k not in index["features"] and k not in index["failed"]]
    if not todo:
        return index
    loader = DataLoader(
        _Indexed(dataset, todo), batch_size=batch_size, num_workers=num_workers, collate_fn=list
    )
    shard_no = len({v["shard"] for v in index["features"].values()})
    for items in loader:
        good = [it for it in items if it["ok"]]
        for it in items:
            if not it["ok"]:
                index["failed"][keys[it["i"]]] = it["error"]
        if good:
            frames = torch.stack([it["frames"] for it in good]).to(device)  # (B, T, H, W, 3)
            feats = encoder(frames).to(dtype).cpu()  # (B, T, P, Dv)
            name = f"shard-{shard_no:05d}.safetensors"
            tmp = directory / f".{name}.tmp"
            save_file({keys[it["i"]]: feats[j].contiguous() for j, it in enumerate(good)}, tmp)
            tmp.replace(directory / name)
            for it in good:
                index["features"][keys[it["i"]]] = {"shard": name}
            shard_no += 1
        _write_index(directory, index)  # after every shard: a killed run keeps what it encoded
    return index


class _Indexed(Dataset):
    """Decodes record i directly (no stand-in on failure) and reports failures instead of raising."""

    def __init__(self, dataset: Any, indices: list[int]) -> None:
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> dict[str, Any]:
        from data.video import VideoDecodeError, sample_frames

        i = self.indices[k]
        rec = self.dataset.records[i]
        try:
            s = sample_frames(
                rec["video"], start=rec.get("start"), end=rec.get("end"), **self.dataset.sample_kw
            )
        except VideoDecodeError as e:
            return {"i": i, "ok": False, "error": str(e)}
        return {"i": i, "ok": True, "frames": s.frames}


class CachedFeatureDataset(Dataset):
    """Items like `VideoCaptionDataset` but with "feats" (T, P, Dv) instead of frames."""

    def __init__(self, records: list[dict[str, Any]], directory: Path) -> None:
        index = load_index(directory)
        self.directory = directory
        keys = [video_key(r) for r in records]  # one stat() per clip
        feats = index["features"]
        self.items = [(r, feats[k]["shard"], k) for r, k in zip(records, keys, strict=True) if k in feats]
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
