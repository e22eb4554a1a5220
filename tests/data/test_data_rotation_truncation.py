"""Rotated clips come back upright and truncated files are never sampled silently, with both decoders."""

from __future__ import annotations

import re
from pathlib import Path

import av
import numpy as np
import pytest
from data_fixtures import long_index, make_rotated_video

from data.video import VideoDecodeError, sample_frames

TIMEOUT = 10.0
BOTH = ("decord", "pyav")


@pytest.fixture(scope="module")
def rotated(tmp_path_factory) -> dict[int, Path]:
    d = tmp_path_factory.mktemp("rotated")
    return {r: make_rotated_video(d / f"rot{r}.mp4", r) for r in (90, -90, 180)}


@pytest.mark.parametrize("rotation", [90, -90, 180])
def test_fixture_carries_its_display_matrix(rotated, rotation):
    with av.open(str(rotated[rotation])) as c:
        s = c.streams.video[0]
        stored = (s.codec_context.height, s.codec_context.width)
        frame = next(c.decode(s))
    assert frame.rotation == (rotation if rotation != 180 else -180)  # FFmpeg reads 180 as -180
    assert stored == ((64, 96) if rotation % 180 else (96, 64))  # ±90: stored landscape


def region_means(frame: np.ndarray) -> tuple[float, float, float]:
    """Mean of the bright block, the grey block and the black part of `upright_pattern`, by fractions
    of the frame (margins keep x264's soft edges out)."""
    f = frame.astype(float).mean(-1)  # (H, W)
    h, w = f.shape
    top = slice(int(0.05 * h), int(0.28 * h))
    bright = f[top, int(0.1 * w) : int(0.4 * w)].mean()
    grey = f[top, int(0.6 * w) : int(0.9 * w)].mean()
    black = f[int(0.45 * h) :].mean()
    return bright, grey, black


@pytest.mark.parametrize("size", [None, (48, 20)])
@pytest.mark.parametrize("decoder", BOTH)
@pytest.mark.parametrize("rotation", [90, -90, 180])
def test_rotated_clip_comes_back_upright(rotated, rotation, decoder, size):
    s = sample_frames(rotated[rotation], num_frames=2, size=size, decoders=(decoder,), timeout_s=TIMEOUT)
    assert s.decoder == decoder and s.warning is None
    # `size` is the upright frame's (H, W): a size applied before turning would come back as (20, 48).
    assert tuple(s.frames.shape) == (2, *(size or (96, 64)), 3)
    for frame in s.frames.numpy():
        bright, grey, black = region_means(frame)
        assert bright > 220 and abs(grey - 120) < 20 and black < 15, (bright, grey, black)


def test_unrotated_portrait_is_left_alone(videos):
    # No display matrix: a clip stored portrait is returned as stored (green quadrant top-left).
    for decoder in BOTH:
        f = sample_frames(videos["portrait"], num_frames=1, decoders=(decoder,)).frames[0].numpy()
        assert f.shape == (854, 480, 3) and f[:400, :230, 1].mean() > 180 and f[440:, :, 1].mean() < 20


def frame_ids(frames) -> list[int]:
    """Which frame of a `make_long_video` clip each sampled frame is, read from its flat bottom half."""
    return [long_index(f[44:].reshape(-1, 3).mean(0)) for f in frames.float().numpy()]


SHARE = re.compile(r"truncated: (\d+) of 96 frames decodable \((\d+)%\)")


def decodable(text: str) -> int:
    """The frame count a truncation message names, after checking that its share agrees with it."""
    m = SHARE.search(text)
    assert m, text
    n, pct = int(m[1]), int(m[2])
    assert 20 <= n <= 31 and pct == 100 * n // 96, text  # ~30% of the frames, share floored
    return n


@pytest.mark.parametrize("decoders", [BOTH, ("decord",), ("pyav",)])
def test_truncated_file_is_an_error_naming_the_share(videos, decoders):
    with pytest.raises(VideoDecodeError) as info:
        sample_frames(videos["cut30"], num_frames=4, decoders=decoders, timeout_s=TIMEOUT)
    err = info.value
    assert str(videos["cut30"]) in str(err) and "\n" not in str(err)
    decodable(err.reason)
    assert err.reason.startswith("truncated:")  # refused before any decoder samples the 28 frames


def test_allow_partial_samples_the_decodable_part_with_a_warning(videos):
    s = sample_frames(videos["cut30"], num_frames=4, allow_partial=True, timeout_s=TIMEOUT)
    n = decodable(s.warning)
    assert s.decoder == "pyav"  # decord cannot open a file whose data stops short of its index
    # Uniform sampling over the n decodable frames (24 fps), not over the 96 the index promises.
    want = [(2 * k + 1) * n // 8 for k in range(4)]
    assert s.indices == want and max(want) < n
    assert s.timestamps == pytest.approx([i / 24 for i in want], abs=1e-6)
    assert s.duration_s == pytest.approx(n / 24, abs=1e-6)
    assert frame_ids(s.frames) == want  # the pixels are those frames
    every = sample_frames(videos["cut30"], num_frames=40, allow_partial=True, timeout_s=TIMEOUT)
    assert every.n_unique == n and frame_ids(every.frames) == every.indices  # up to the last one


def test_allow_partial_needs_pyav(videos):
    with pytest.raises(VideoDecodeError, match="only the pyav decoder reads the decodable part") as info:
        sample_frames(videos["cut30"], allow_partial=True, decoders=("decord",), timeout_s=TIMEOUT)
    decodable(info.value.reason)


@pytest.mark.parametrize("allow_partial", [False, True])
@pytest.mark.parametrize("decoder", BOTH)
def test_intact_file_has_no_warning(videos, decoder, allow_partial):
    s = sample_frames(
        videos["long96"], num_frames=4, decoders=(decoder,), allow_partial=allow_partial, timeout_s=TIMEOUT
    )
    assert s.decoder == decoder and s.warning is None
    assert s.indices == [12, 36, 60, 84] and s.duration_s == pytest.approx(4.0, abs=1e-6)
    assert frame_ids(s.frames) == s.indices
