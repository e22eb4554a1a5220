"""Session fixtures for the data tests: small clips written once into a temporary folder."""

from __future__ import annotations

from pathlib import Path

import pytest
from data_fixtures import make_long_video, make_video


@pytest.fixture(scope="session")
def videos(tmp_path_factory) -> dict[str, Path]:
    """Clips shared by the tests (each takes milliseconds to write); all good but `cut30`."""
    d = tmp_path_factory.mktemp("videos")
    long = make_long_video(d / "long96.mp4")
    data = long.read_bytes()
    cut30 = d / "cut30.mp4"
    cut30.write_bytes(data[: int(0.3 * len(data))])
    return {
        "cfr16": make_video(d / "cfr16.mp4"),  # 16 frames at 8 fps = 2.0 s
        "short3": make_video(d / "short3.mp4", frames=3),
        "vfr": make_video(d / "vfr.mp4", frames=6, pts_ms=[0, 100, 250, 700, 900, 1500]),
        "odd": make_video(d / "odd.mp4", 853, 480, frames=4, pix_fmt="yuv444p"),  # 4:2:0 needs even sizes
        "portrait": make_video(d / "portrait.mp4", 480, 854, frames=4),
        "long96": long,  # 96 frames at 24 fps, faststart: the index comes before the data
        "cut30": cut30,  # its first 30% of bytes: the index promises 96 frames, the data holds ~28
    }
