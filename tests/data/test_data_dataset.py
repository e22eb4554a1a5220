"""`VideoCaptionDataset`: items, skipping failed videos with a shared count, and the failure-share stop."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from data_fixtures import collate
from torch.utils.data import DataLoader

from data.dataset import TooManyFailedVideos, VideoCaptionDataset, dataset_from_config
from vlm.config import to_typed  # also registers the schemas that `compose` checks against


def corpus(root: Path, videos, n_good: int, n_bad: int) -> Path:
    rows = []
    for i in range(n_good):
        shutil.copy(videos["cfr16"], root / f"g{i}.mp4")
        rows.append({"video": f"g{i}.mp4", "caption": f"좋은 영상 {i}", "attributes": {"k": i}})
    for i in range(n_bad):
        (root / f"b{i}.mp4").write_bytes(b"\x00" * 100)
        rows.append({"video": f"b{i}.mp4", "caption": f"깨진 영상 {i}"})
    ann = root / "ann.jsonl"
    ann.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return ann


def test_items_and_collate(tmp_path, videos):
    ds = VideoCaptionDataset.from_file(corpus(tmp_path, videos, 3, 0), num_frames=4, size=32)
    item = ds[1]
    assert tuple(item["frames"].shape) == (4, 32, 32, 3) and item["frames"].dtype == torch.uint8
    assert (
        item["captions"] == ["좋은 영상 1"] and item["video"] == "g1.mp4" and item["attributes"] == {"k": 1}
    )
    batch = next(iter(DataLoader(ds, batch_size=3, collate_fn=collate)))
    assert tuple(batch["frames"].shape) == (3, 4, 32, 32, 3)
    assert batch["video"] == ["g0.mp4", "g1.mp4", "g2.mp4"] and len(batch["attributes"]) == 3


def test_failed_video_is_skipped_logged_and_counted(tmp_path, videos, caplog):
    ds = VideoCaptionDataset.from_file(
        corpus(tmp_path, videos, 9, 1), num_frames=2, size=16, max_failed_share=0.1
    )
    with caplog.at_level(logging.WARNING, logger="data.dataset"):
        item = ds[9]  # the broken one: the next record (wrapping around) stands in
    assert item["video"] == "g0.mp4"
    assert ds.failed == 1 and ds.failed_videos() == ["b0.mp4"]
    assert any("b0.mp4" in r.getMessage() and "skipping" in r.getMessage() for r in caplog.records)
    ds[9]  # the same video failing again (a later epoch) is not counted twice
    assert ds.failed == 1


def test_too_many_failures_stop_with_clear_message(tmp_path, videos):
    ds = VideoCaptionDataset.from_file(
        corpus(tmp_path, videos, 8, 2), num_frames=2, size=16, max_failed_share=0.1
    )
    # b0 fails (1 of 10 = 10%: allowed), its stand-in b1 fails too (20%): stop.
    with pytest.raises(
        TooManyFailedVideos, match=r"2 of 10 videos \(20\.0%\) failed.*max_failed_share=10\.0%"
    ):
        ds[8]
    assert ds.failed_videos() == ["b0.mp4", "b1.mp4"]


def test_failure_count_is_shared_by_dataloader_workers(tmp_path, videos):
    ds = VideoCaptionDataset.from_file(
        corpus(tmp_path, videos, 6, 2), num_frames=2, size=16, max_failed_share=0.5
    )
    loader = DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate)
    batches = list(loader)
    assert sum(len(b["video"]) for b in batches) == 8
    assert all(v.startswith("g") for b in batches for v in b["video"])
    assert ds.failed == 2  # counted in the workers, visible in the parent


def test_dataset_from_config(tmp_path, videos, compose):
    ann = corpus(tmp_path, videos, 2, 0)
    cfg = to_typed(compose("train", [f"data.root={tmp_path}", f"data.train={ann}", f"data.val={ann}"])).data
    ds = dataset_from_config(cfg, "val")
    assert len(ds) == 2 and ds.sample_kw["num_frames"] == cfg.num_frames
    assert ds.sample_kw["allow_partial"] is cfg.allow_partial is False  # truncated files fail by default
    assert ds[0]["frames"].shape[0] == cfg.num_frames
