"""Helpers that write fixture videos with PyAV (nothing is committed), fake decode workers, and the
batch collate the dataset tests load with.

Frame i of a `make_video` clip has red level `frame_level(i)` everywhere except a green top-left
quadrant, so a test can tell from the pixels which frame it got and whether the image is upright.
`make_long_video` names up to 100 frames by colour; `make_rotated_video` stores a picture turned back
by its display-matrix rotation.
"""

from __future__ import annotations

import sys
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import torch


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


def long_colour(i: int) -> tuple[int, int]:
    """(red, green) of frame i of a `make_long_video` clip: tens in red, units in green, 20 levels apart."""
    return 20 + 20 * (i // 10), 20 + 20 * (i % 10)


def long_index(rgb: np.ndarray) -> int:
    """The frame index a `make_long_video` colour names (nearest levels: survives x264 and YUV)."""
    tens, units = (round((float(v) - 20) / 20) for v in rgb[:2])
    return 10 * tens + units


def make_long_video(path: Path, frames: int = 96, fps: int = 24, seed: int = 0) -> Path:
    """A faststart mp4 (index before the data) whose frames all take about the same number of bytes.

    Top half: fresh seeded noise every frame (so a cut at x% of the bytes keeps about x% of the frames);
    bottom half: flat `long_colour(i)`, which names the frame (up to 100 frames).
    """
    rng = np.random.default_rng(seed)
    with av.open(str(path), "w", format="mp4", options={"movflags": "faststart"}) as c:
        s = c.add_stream("libx264", rate=fps, options={"preset": "ultrafast", "crf": "18"})
        s.width, s.height, s.pix_fmt = 64, 64, "yuv420p"
        for i in range(frames):
            img = np.zeros((64, 64, 3), np.uint8)
            img[:32] = rng.integers(0, 256, size=(32, 64, 3), dtype=np.uint8)
            img[32:, :, :2] = long_colour(i)
            f = av.VideoFrame.from_ndarray(img, format="rgb24")
            f.pts, f.time_base = i, Fraction(1, fps)
            c.mux(s.encode(f))
        c.mux(s.encode())
    return path


def upright_pattern(height: int = 96, width: int = 64) -> np.ndarray:
    """(H, W, 3): top third bright on the left half, grey on the right half; the rest black.

    Any quarter turn or mirror of it puts the bright block somewhere else or swaps it with the grey one.
    """
    img = np.zeros((height, width, 3), np.uint8)
    img[: height // 3, : width // 2] = 250
    img[: height // 3, width // 2 :] = 120
    return img


def make_rotated_video(path: Path, rotation: int, frames: int = 4) -> Path:
    """Store `upright_pattern()` turned back by `rotation` degrees (counter-clockwise) and write the
    display matrix that turns it upright again, as a phone does for portrait clips."""
    stored = np.ascontiguousarray(np.rot90(upright_pattern(), -rotation // 90))  # (64, 96, 3) for ±90
    with av.open(str(path), "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=8, options={"preset": "ultrafast", "crf": "18"})
        s.width, s.height, s.pix_fmt = stored.shape[1], stored.shape[0], "yuv420p"
        s.set_display_rotation(rotation)
        for i in range(frames):
            f = av.VideoFrame.from_ndarray(stored, format="rgb24")
            f.pts, f.time_base = i, Fraction(1, 8)
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


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack frames to (B, T, H, W, 3); keep captions/videos/attributes as per-item lists.

    Needs a fixed T and size across items (mode="uniform" with `size` set). Training batches through
    `vlm.train`'s collator instead; this one only lets the tests load `VideoCaptionDataset` items.
    """
    out: dict[str, Any] = {
        "frames": torch.stack([it["frames"] for it in items]),  # (B, T, H, W, 3) uint8
        "captions": [it["captions"] for it in items],
        "video": [it["video"] for it in items],
    }
    if all("attributes" in it for it in items):
        out["attributes"] = [it["attributes"] for it in items]
    return out
