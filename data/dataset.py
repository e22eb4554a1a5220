"""`VideoCaptionDataset`: annotation records -> sampled frames + captions, tolerant of a few bad videos.

A video that fails to decode is skipped (the next record is returned instead, so batches keep their
size), logged once with its reason, and counted. The count is shared by all DataLoader workers (a
shared-memory flag per record), so the limit holds for the whole run: once more than
`max_failed_share` of the records have failed, `TooManyFailedVideos` stops training with a clear message.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
from typing import Any

import torch
from torch.utils.data import Dataset

from data.annotations import read_annotations
from data.video import VideoDecodeError, sample_frames

log = logging.getLogger(__name__)


class TooManyFailedVideos(RuntimeError):
    """More than the allowed share of videos could not be decoded: the data, not the model, is broken."""


class VideoCaptionDataset(Dataset):
    """Items: {"frames": (T, H, W, 3) uint8, "captions": list[str], "video": rel path, "attributes"?}."""

    def __init__(
        self,
        records: list[dict[str, Any]],
        num_frames: int = 8,
        size: int | tuple[int, int] | None = None,
        mode: str = "uniform",
        fps: float | None = None,
        max_frames: int | None = None,
        timeout_s: float = 30.0,
        max_failed_share: float = 0.01,
        allow_partial: bool = False,
    ) -> None:
        if not records:
            raise ValueError("VideoCaptionDataset needs at least one record")
        if not 0.0 <= max_failed_share < 1.0:
            raise ValueError(f"max_failed_share must be in [0, 1), got {max_failed_share}")
        self.records = records
        self.sample_kw = dict(
            num_frames=num_frames,
            size=size,
            mode=mode,
            fps=fps,
            max_frames=max_frames,
            timeout_s=timeout_s,
            allow_partial=allow_partial,
        )
        self.max_failed_share = max_failed_share
        # One flag per record in shared memory: DataLoader workers (forked or spawned) see the same
        # array, and a video that fails again in a later epoch is not counted twice.
        self._failed = mp.Array("b", len(records))

    @classmethod
    def from_file(
        cls, annotations: str | os.PathLike, root: str | os.PathLike | None = None, **kw: Any
    ) -> VideoCaptionDataset:
        return cls(read_annotations(annotations, root), **kw)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def failed(self) -> int:
        """Number of distinct records whose video failed so far (all workers)."""
        with self._failed.get_lock():
            return sum(self._failed[:])

    def failed_videos(self) -> list[str]:
        return [r["rel"] for r, bad in zip(self.records, self._failed[:], strict=True) if bad]

    def _record_failure(self, i: int, err: VideoDecodeError) -> None:
        with self._failed.get_lock():
            new = not self._failed[i]
            self._failed[i] = 1
            count = sum(self._failed[:])
        if new:
            log.warning("skipping video %d/%d that failed: %s", count, len(self), err)
        if count > self.max_failed_share * len(self):
            raise TooManyFailedVideos(
                f"{count} of {len(self)} videos ({count / len(self):.1%}) failed to decode, more than "
                f"max_failed_share={self.max_failed_share:.1%}; last: {err}. "
                f"Run `python -m data.check annotations=... root=...` to list them."
            )

    def decode(self, i: int) -> torch.Tensor:
        """Record i's sampled frames (T, H, W, 3) uint8; raises VideoDecodeError (no stand-in)."""
        rec = self.records[i]
        return sample_frames(rec["video"], start=rec["start"], end=rec["end"], **self.sample_kw).frames

    def __getitem__(self, i: int) -> dict[str, Any]:
        n = len(self.records)
        for k in range(n):
            j = (i + k) % n  # on failure, the next record stands in so the batch keeps its size
            if self._failed[j]:
                continue  # known bad: do not pay its timeout again
            rec = self.records[j]
            try:
                frames = self.decode(j)
            except VideoDecodeError as e:
                self._record_failure(j, e)
                continue
            item = {"frames": frames, "captions": rec["captions"], "video": rec["rel"]}
            if "attributes" in rec:
                item["attributes"] = rec["attributes"]
            return item
        raise TooManyFailedVideos("every video in the dataset failed to decode")


def dataset_from_config(cfg: Any, split: str = "train") -> VideoCaptionDataset:
    """Build the dataset for `split` ("train" or "val") from a typed `data` config (conf/data/*.yaml)."""
    return VideoCaptionDataset.from_file(
        getattr(cfg, split),
        root=cfg.root,
        num_frames=cfg.num_frames,
        size=cfg.image_size,
        mode=cfg.sample_mode,
        fps=cfg.fps,
        max_frames=cfg.max_frames,
        timeout_s=float(cfg.decode_timeout_s),
        max_failed_share=cfg.max_failed_share,
        allow_partial=cfg.allow_partial,
    )
