"""Helpers that write fixture videos with PyAV (nothing is committed) and fake decode workers.

Frame i of a `make_video` clip has red level `frame_level(i)` everywhere except a green top-left
quadrant, so a test can tell from the pixels which frame it got and whether the image is upright.
"""

from __future__ import annotations

import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np


def frame_level(i: int) -> int:
    return 10 + 15 * i  # distinct per frame (up to 16 frames), far apart enough to survive compression


def make_video(
    path: Path,
    width: int = 64,
    height: int = 64,
    frames: int = 16,
    fps: int = 8,
    pix_fmt: str = "yuv420p",
    pts_ms: list[int] | None = None,
    faststart: bool = False,
) -> Path:
    """Write an H.264 mp4; `pts_ms` gives variable-frame-rate timestamps in milliseconds."""
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", format="mp4", options=options) as c:
        s = c.add_stream("libx264", rate=fps, options={"preset": "ultrafast", "crf": "18"})
        s.width, s.height, s.pix_fmt = width, height, pix_fmt
        if pts_ms is not None:
            s.codec_context.time_base = Fraction(1, 1000)
        for i in range(frames):
            img = np.zeros((height, width, 3), np.uint8)
            img[..., 0] = frame_level(i)
            img[: max(1, height // 2), : max(1, width // 2), 1] = 200  # green top-left quadrant
            f = av.VideoFrame.from_ndarray(img, format="rgb24")
            if pts_ms is not None:
                f.pts, f.time_base = pts_ms[i], Fraction(1, 1000)
            c.mux(s.encode(f))
        c.mux(s.encode())
    return path


def make_audio_only(path: Path) -> Path:
    with av.open(str(path), "w", format="mp4") as c:
        s = c.add_stream("aac", rate=16000)
        for k in range(10):
            fr = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            fr.sample_rate, fr.pts = 16000, k * 1024
            c.mux(s.encode(fr))
        c.mux(s.encode())
    return path


def write_worker_script(path: Path, patch: str) -> list[str]:
    """A decode-worker command whose decord is replaced by `patch` (Python source run first)."""
    path.write_text(
        "import decord, os, signal, time\n" + patch + "\nfrom data.decode_worker import main\nmain()\n"
    )
    return [sys.executable, str(path)]
