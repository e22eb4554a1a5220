"""Which frames to decode: pure index arithmetic over a video's frame timestamps (no decoding here).

Both decoders (decord in the worker, PyAV as fallback) first read the presentation timestamps of every
frame from the container index, then call `plan_frames`, so both pick exactly the same frames.

Sampling is done in *time*, not in frame counts, so variable-frame-rate videos are sampled evenly:
a target time t maps to the frame on screen at t (the last frame whose pts <= t). For a constant
frame rate this equals the usual index formula `floor((k + 0.5) * n / T)`.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

MODES = ("uniform", "fps")


class WindowError(ValueError):
    """The requested start/end window does not overlap the video (or is malformed)."""


@dataclass
class FramePlan:
    """The frames to decode for one call."""

    indices: list[int]  # frame indices into the whole video, non-decreasing, may repeat
    timestamps: list[float]  # seconds from the first frame, one per index
    n_unique: int  # distinct frames among `indices` (< T when the window has fewer frames than asked)


def check_args(num_frames: int, mode: str, fps: float | None, max_frames: int | None) -> None:
    """Validate sampling arguments before any file is touched (a config error, not a video error)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "uniform" and (not isinstance(num_frames, int) or num_frames < 1):
        raise ValueError(f"num_frames must be a positive int, got {num_frames!r}")
    if mode == "fps" and (fps is None or not fps > 0):
        raise ValueError(f"mode='fps' needs fps > 0, got {fps!r}")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames!r}")


def resolve_window(duration: float, start: float | None, end: float | None) -> tuple[float, float]:
    """Clamp an optional [start, end) window (seconds) to [0, duration); raise if nothing is left.

    An `end` past the video is clamped rather than refused: annotation end times are often rounded up
    by a few frames. A window that starts at or after the end, or is empty, is an error.
    """
    a = 0.0 if start is None else float(start)
    b = duration if end is None else float(end)
    if not (math.isfinite(a) and math.isfinite(b)):
        raise WindowError(f"window start={start} end={end} is not finite")
    if a < 0:
        raise WindowError(f"window start {a:g}s is negative")
    if a >= duration:
        raise WindowError(f"window start {a:g}s is past the video's end ({duration:.3f}s)")
    if b <= a:
        raise WindowError(f"window end {b:g}s is not after start {a:g}s")
    return a, min(b, duration)


def target_times(
    a: float, b: float, num_frames: int, mode: str, fps: float | None, max_frames: int | None
) -> list[float]:
    """Times (seconds) to sample inside [a, b): segment midpoints, T of them or (b - a) * fps of them."""
    span = b - a
    if mode == "uniform":
        count = num_frames if max_frames is None else min(num_frames, max_frames)
        return [a + (k + 0.5) * span / count for k in range(count)]
    # fps mode: one frame per 1/fps seconds (at the midpoint of each slot), at least one.
    assert fps is not None
    count = max(1, math.floor(span * fps + 1e-6))
    grid = [a + (k + 0.5) / fps for k in range(count)]
    if max_frames is not None and count > max_frames:
        # Uniform subsampling of the fps grid keeps the frames evenly spread over the window.
        grid = [grid[math.floor((j + 0.5) * count / max_frames)] for j in range(max_frames)]
    return grid


def plan_frames(
    pts: list[float],
    duration: float,
    num_frames: int = 8,
    mode: str = "uniform",
    fps: float | None = None,
    max_frames: int | None = None,
    start: float | None = None,
    end: float | None = None,
) -> FramePlan:
    """Pick frame indices for one call.

    pts: presentation time of every frame, seconds from the first frame, sorted ascending.
    duration: end time of the last frame (its pts plus its duration).
    """
    if not pts:
        raise WindowError("video has no frames")
    a, b = resolve_window(duration, start, end)
    # Frames shown inside the window: the one on screen at `a` up to the last one starting before `b`.
    lo = max(0, bisect.bisect_right(pts, a) - 1)
    hi = max(lo + 1, bisect.bisect_left(pts, b))  # exclusive
    indices = []
    for t in target_times(a, b, num_frames, mode, fps, max_frames):
        i = bisect.bisect_right(pts, t + 1e-9) - 1  # the frame on screen at t (1e-9: float pts jitter)
        indices.append(min(max(i, lo), hi - 1))
    return FramePlan(indices=indices, timestamps=[pts[i] for i in indices], n_unique=len(set(indices)))
