"""Lightning parts of folder captioning: the dataset (decoding in workers), the data module (resume plan
and rank sharding), the predicting LightningModule, and the writer callback that owns the appends.

`Trainer.predict` runs them; with `devices=N` / `num_nodes=M` each process takes every world-th video of
the same sorted to-do list (no padding, so no video twice) and appends to its own part file.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader, Dataset

from vlm.infer.discover import Video
from vlm.infer.output import CaptionOutput, is_record, latest, plan
from vlm.infer.srt import write_srt
from vlm.model.captioner import VideoCaptioner
from vlm.util.errors import Interrupted, RunFailure, one_line
from vlm.util.jsonl import append_jsonl, read_jsonl
from vlm.util.ranks import RankSlice
from vlm.util.signals import StopSignal, signal_name


def windows(duration: float, seconds: float) -> list[tuple[float, float]]:
    """[start, end) windows of `seconds` covering [0, duration); the last one may be shorter."""
    n = max(1, math.ceil(duration / seconds - 1e-9))
    return [(round(k * seconds, 3), round(min((k + 1) * seconds, duration), 3)) for k in range(n)]


class VideoFolder(Dataset):
    """Item: the video, and either its sampled frames (one entry per window) or the decode error."""

    def __init__(self, videos: list[Video], sampling: dict[str, Any], segment_seconds: float | None) -> None:
        self.videos, self.sampling, self.segment = videos, sampling, segment_seconds

    def __len__(self) -> int:
        return len(self.videos)

    def __getitem__(self, i: int) -> dict[str, Any]:
        from data.video import VideoDecodeError, sample_frames

        v = self.videos[i]
        item: dict[str, Any] = {"video": v, "error": None, "windows": []}
        try:
            if self.segment is None:
                s = sample_frames(v.path, **self.sampling)
                item["windows"].append((0.0, s.duration_s, s))
            else:
                # the first window also tells the duration (an `end` past the video is clamped)
                first = sample_frames(v.path, start=0.0, end=self.segment, **self.sampling)
                spans = windows(first.duration_s, self.segment)
                item["windows"].append((*spans[0], first))
                for a, b in spans[1:]:
                    item["windows"].append((a, b, sample_frames(v.path, start=a, end=b, **self.sampling)))
        except VideoDecodeError as e:
            item = {"video": v, "error": one_line(e), "windows": []}
        except Exception as e:  # anything else is still this video's problem, not the run's
            item = {"video": v, "error": f"{v.path}: {type(e).__name__}: {one_line(e)}", "windows": []}
        return item


def collate(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return items  # frames stay per window: videos may differ in frame count (fps mode)


class FolderData(L.LightningDataModule):
    """Plans after every process has started (rank 0 repaired the output before), from the same file."""

    def __init__(self, videos: list[Video], output: Path, retry_failed: bool, sampling: dict[str, Any],
                 segment_seconds: float | None, batch_size: int, num_workers: int) -> None:  # fmt: skip
        super().__init__()
        self.videos, self.output, self.retry_failed = videos, output, retry_failed
        self.sampling, self.segment = sampling, segment_seconds
        self.batch_size, self.num_workers = batch_size, num_workers
        self.todo: list[Video] = []
        self.done: list[Video] = []

    def setup(self, stage: str) -> None:
        self.trainer.strategy.barrier("caption-plan")
        records = latest([r for r in read_jsonl(self.output).objects if is_record(r)])
        self.todo, self.done = plan(self.videos, records, self.retry_failed)

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        return batch  # frames move to the device per chunk in `_captions`; the rest is metadata

    def predict_dataloader(self) -> DataLoader:
        t = self.trainer
        return DataLoader(
            VideoFolder(self.todo, self.sampling, self.segment),
            batch_size=self.batch_size,
            sampler=RankSlice(len(self.todo), t.global_rank, t.world_size),
            num_workers=self.num_workers,
            collate_fn=collate,
            prefetch_factor=4 if self.num_workers else None,  # decode ahead while the model generates
        )


class CaptionPredictor(L.LightningModule):
    """predict_step: a batch of decoded videos → one JSON-ready record per video."""

    def __init__(
        self, captioner: VideoCaptioner, generation: dict[str, Any], batch_size: int, fixed: dict[str, Any]
    ) -> None:
        super().__init__()
        self.captioner, self.generation, self.rows = captioner, generation, batch_size
        self.fixed = fixed  # fields every line carries (model, prompt_sha, segment_seconds)

    def _captions(self, frames: list[torch.Tensor]) -> list[str | BaseException]:
        """Captions for a list of (T, H, W, 3) clips, batched by frame count in chunks of `rows`."""
        out: list[str | BaseException] = [""] * len(frames)
        groups: dict[int, list[int]] = {}
        for i, f in enumerate(frames):
            groups.setdefault(f.shape[0], []).append(i)
        for idx in groups.values():
            for k in range(0, len(idx), self.rows):
                chunk = idx[k : k + self.rows]
                try:
                    x = torch.stack([frames[i] for i in chunk]).to(self.device)  # (B, T, H, W, 3)
                    caps: list[Any] = self.captioner.caption(x, **self.generation)
                except (RuntimeError, ValueError) as e:  # e.g. out of memory on one long video
                    caps = [e] * len(chunk)
                for i, c in zip(chunk, caps, strict=True):
                    out[i] = c
        return out

    def predict_step(self, batch: list[dict[str, Any]], batch_idx: int) -> list[dict[str, Any]]:
        clips = [w[2].frames for item in batch for w in item["windows"]]
        caps = iter(self._captions(clips))
        records = []
        for item in batch:
            v: Video = item["video"]
            rec: dict[str, Any] = {
                "video": v.rel, "caption": None, "error": item["error"], "frames": None, "timestamps": None,
                "duration_s": None, "decoder": None, **self.fixed, "size": v.size, "mtime_ns": v.mtime_ns,
            }  # fmt: skip
            if item["error"] is None:
                segs = [(a, b, s, next(caps)) for a, b, s in item["windows"]]
                bad = next((c for *_, c in segs if isinstance(c, BaseException)), None)
                if bad is not None:
                    rec["error"] = f"{v.path}: captioning failed: {one_line(bad)}"
                else:
                    first = segs[0][2]
                    rec.update(
                        caption=" ".join(c for *_, c in segs) if len(segs) > 1 else segs[0][3],
                        frames=[i for _, _, s, _ in segs for i in s.indices],
                        timestamps=[t for _, _, s, _ in segs for t in s.timestamps],
                        duration_s=first.duration_s,
                        decoder=first.decoder,
                    )
                    warnings = sorted({s.warning for _, _, s, _ in segs if s.warning})
                    if warnings:
                        rec["warning"] = "; ".join(warnings)
                    if self.fixed["segment_seconds"]:
                        rec["segments"] = [
                            {
                                "start": a,
                                "end": b,
                                "caption": c,
                                "frames": s.indices,
                                "timestamps": s.timestamps,
                            }
                            for a, b, s, c in segs
                        ]
            records.append(rec)
        return records


class JsonlWriter(BasePredictionWriter):
    """Appends each finished batch to this rank's file, flushed and fsync'ed before the next batch;
    writes SRTs in segment mode; shows videos/s and ETA on rank 0; stops after the batch on a signal."""

    def __init__(self, output: CaptionOutput, stop: StopSignal, show_progress: bool = True) -> None:
        super().__init__(write_interval="batch")
        self.output, self.stop, self.show_progress = output, stop, show_progress
        self.counts = {"ok": 0, "failed": 0}
        self.file = None
        self.bar = None
        self.started = self.ended = 0.0

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.file = self.output.appender(trainer.global_rank, trainer.world_size)
        if self.show_progress and trainer.is_global_zero:
            from tqdm import tqdm

            dm = trainer.datamodule
            n = len(range(trainer.global_rank, len(dm.todo), trainer.world_size))
            desc = "captioning" if trainer.world_size == 1 else f"captioning (rank 0 of {trainer.world_size})"
            self.bar = tqdm(total=n, unit="video", desc=desc, file=sys.stderr, dynamic_ncols=True)

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx
    ):
        if pl_module.fixed["segment_seconds"]:
            for rec in prediction:  # subtitles first: a line in the output means its SRT is there
                if rec["error"] is None:
                    write_srt(self.output.path, rec["video"], rec["segments"])
        try:
            append_jsonl(self.file, prediction)
        except (
            OSError
        ) as e:  # a full disk, a vanished mount: every earlier line is on disk, this batch is not
            raise RunFailure(
                f"output={self.file.name}: cannot write ({e.strerror or e}); rerun to resume"
            ) from None
        for r in prediction:
            self.counts["failed" if r["error"] else "ok"] += 1
        if self.bar is not None:
            self.bar.update(len(prediction))
            self.bar.set_postfix(self.counts, refresh=False)
        if self.stop.signum is not None:  # this batch is on disk: stop here
            raise Interrupted(
                self.stop.signum,
                f"stopped by {signal_name(self.stop.signum)} after {sum(self.counts.values())} video(s), all "
                f"written to {self.output.path}; run the same command again to resume",
            )

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.close()

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self.close()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def finish(self, trainer: L.Trainer) -> dict[str, Any]:
        """After `predict` on every rank (also one that had no batch): under DDP, wait for all part
        files, then rank 0 appends them to the output. Returns counts over all ranks (rank 0)."""
        counts, per_rank = dict(self.counts), [sum(self.counts.values())]
        if trainer.world_size > 1:
            trainer.strategy.barrier("caption-merge")
            if trainer.is_global_zero:
                from vlm.infer.output import shard_paths

                parts = [
                    [r for r in read_jsonl(s).objects if is_record(r)] for s in shard_paths(self.output.path)
                ]
                per_rank = [len(p) for p in parts]
                new = self.output.fold_shards()
                counts = {
                    "ok": sum(r["error"] is None for r in new),
                    "failed": sum(r["error"] is not None for r in new),
                }
        self.ended = time.perf_counter()  # after the merge: the run's wall time, not one rank's
        return {"counts": counts, "per_rank": per_rank}
