"""Frame selection: hand-computed indices and timestamps for both modes, windows, short and VFR clips,
checked on the pure planner and on real H.264 files through both decoders."""

from __future__ import annotations

import pytest
from data_fixtures import frame_level

from data.sampling import WindowError, plan_frames
from data.video import sample_frames

CFR16 = [i / 8 for i in range(16)]  # 16 frames at 8 fps


@pytest.mark.parametrize(
    ("kw", "indices"),
    [
        # uniform: midpoints of T equal segments of 2 s -> t = 0.25, 0.75, 1.25, 1.75 -> frame floor(8 t)
        ({"num_frames": 4}, [2, 6, 10, 14]),
        ({"num_frames": 8}, [1, 3, 5, 7, 9, 11, 13, 15]),
        # window [0.5, 1.5): t = 0.5 + (k + 0.5) / 8 -> frames 4..11
        ({"num_frames": 8, "start": 0.5, "end": 1.5}, [4, 5, 6, 7, 8, 9, 10, 11]),
        # fps=2 over 2 s: 4 slots, midpoints 0.25 .. 1.75
        ({"mode": "fps", "fps": 2.0}, [2, 6, 10, 14]),
        # fps=3: 6 slots, t = (k + 0.5) / 3 = 0.167, 0.5, 0.833, 1.167, 1.5, 1.833
        ({"mode": "fps", "fps": 3.0}, [1, 4, 6, 9, 12, 14]),
        # ... capped at 4 by taking slots floor((j + 0.5) * 6 / 4) = 0, 2, 3, 5
        ({"mode": "fps", "fps": 3.0, "max_frames": 4}, [1, 6, 9, 14]),
        # end past the video is clamped to its 2.0 s
        ({"num_frames": 2, "start": 1.0, "end": 9.0}, [10, 14]),
    ],
)
def test_plan_cfr(kw, indices):
    plan = plan_frames(CFR16, 2.0, **kw)
    assert plan.indices == indices
    assert plan.timestamps == [i / 8 for i in indices]
    assert plan.n_unique == len(set(indices))


def test_plan_short_video_repeats_nearest():
    plan = plan_frames([0, 0.125, 0.25], 0.375, num_frames=8)
    # floor((k + 0.5) * 3 / 8)
    assert plan.indices == [0, 0, 0, 1, 1, 2, 2, 2]
    assert plan.n_unique == 3


def test_plan_vfr_samples_time_not_index():
    pts = [0, 0.1, 0.25, 0.7, 0.9, 1.5]
    plan = plan_frames(pts, 1.6, num_frames=4, end=1.5)
    # t = 0.1875, 0.5625, 0.9375, 1.3125 -> frames on screen then; index-based would be [0, 2, 3, 5]
    assert plan.indices == [1, 2, 4, 4]
    assert plan.timestamps == [0.1, 0.25, 0.9, 0.9]


@pytest.mark.parametrize(
    ("start", "end", "match"),
    [
        (2.0, None, "past the video"),
        (5.0, 6.0, "past the video"),
        (1.0, 1.0, "not after"),
        (-1.0, 1.0, "negative"),
    ],
)
def test_plan_bad_window(start, end, match):
    with pytest.raises(WindowError, match=match):
        plan_frames(CFR16, 2.0, start=start, end=end)


@pytest.mark.parametrize("decoder", ["decord", "pyav"])
@pytest.mark.parametrize(
    ("kw", "indices"),
    [
        ({"num_frames": 4}, [2, 6, 10, 14]),
        ({"num_frames": 4, "start": 0.5, "end": 1.5}, [5, 7, 9, 11]),
        ({"mode": "fps", "fps": 3.0, "max_frames": 4}, [1, 6, 9, 14]),
    ],
)
def test_real_file_indices_timestamps_and_pixels(videos, decoder, kw, indices):
    s = sample_frames(videos["cfr16"], decoders=(decoder,), **kw)
    assert s.decoder == decoder
    assert s.indices == indices
    assert s.timestamps == pytest.approx([i / 8 for i in indices], abs=1e-6)
    assert s.duration_s == pytest.approx(2.0, abs=1e-6)
    assert s.frames.dtype.is_floating_point is False and tuple(s.frames.shape) == (len(indices), 64, 64, 3)
    # The decoded pixels are those frames: red level of the bottom-right quadrant identifies the frame.
    red = s.frames[:, 40:, 40:, 0].float().mean(dim=(1, 2))
    assert red.tolist() == pytest.approx([frame_level(i) for i in indices], abs=4)


@pytest.mark.parametrize("decoder", ["decord", "pyav"])
def test_real_short_video_repeats(videos, decoder):
    s = sample_frames(videos["short3"], num_frames=8, decoders=(decoder,))
    assert s.indices == [0, 0, 0, 1, 1, 2, 2, 2]
    assert s.n_unique == 3
    assert s.frames.shape[0] == 8
    assert bool((s.frames[0] == s.frames[2]).all()) and bool((s.frames[3] == s.frames[4]).all())
    assert not bool((s.frames[2] == s.frames[3]).all())


@pytest.mark.parametrize("decoder", ["decord", "pyav"])
def test_real_vfr(videos, decoder):
    s = sample_frames(videos["vfr"], num_frames=4, end=1.5, decoders=(decoder,))
    assert s.indices == [1, 2, 4, 4]
    assert s.timestamps == pytest.approx([0.1, 0.25, 0.9, 0.9], abs=1e-6)
    red = s.frames[:, 40:, 40:, 0].float().mean(dim=(1, 2))
    assert red.tolist() == pytest.approx([frame_level(i) for i in [1, 2, 4, 4]], abs=4)
