"""Session fixtures for the data tests: small good clips written once into a temporary folder."""

from __future__ import annotations

from pathlib import Path

import pytest
from data_fixtures import make_video


@pytest.fixture(scope="session")
def videos(tmp_path_factory) -> dict[str, Path]:
    """Good clips shared by the tests (each takes milliseconds to write)."""
    d = tmp_path_factory.mktemp("videos")
    return {
        "cfr16": make_video(d / "cfr16.mp4"),  # 16 frames at 8 fps = 2.0 s
        "short3": make_video(d / "short3.mp4", frames=3),
        "vfr": make_video(d / "vfr.mp4", frames=6, pts_ms=[0, 100, 250, 700, 900, 1500]),
        "odd": make_video(d / "odd.mp4", 853, 480, frames=4, pix_fmt="yuv444p"),  # 4:2:0 needs even sizes
        "portrait": make_video(d / "portrait.mp4", 480, 854, frames=4),
    }
