"""`sample_frames` on odd, huge and broken inputs: clear VideoDecodeError, bounded time, fallback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from data_fixtures import frame_level, make_audio_only, make_video, write_worker_script
from PIL import Image

import data.video as video
from data.video import VideoDecodeError, sample_frames

TIMEOUT = 10.0  # s; every bad input must be refused well within it


def assert_refused(path, match: str, **kw) -> VideoDecodeError:
    t0 = time.monotonic()
    with pytest.raises(VideoDecodeError, match=match) as info:
        sample_frames(path, num_frames=4, timeout_s=TIMEOUT, **kw)
    assert time.monotonic() - t0 < TIMEOUT
    err = info.value
    assert str(path) in str(err) and "\n" not in str(err)  # names the file, one line
    return err


@pytest.fixture(scope="module")
def bad(tmp_path_factory, videos) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad")
    good = videos["cfr16"].read_bytes()
    (d / "zero.mp4").write_bytes(b"")
    (d / "half.mp4").write_bytes(good[: len(good) // 2])  # moov atom at the end: index lost
    fast = make_video(d / "fast_src.mp4", frames=16, faststart=True).read_bytes()
    (d / "fast_trunc.mp4").write_bytes(fast[: len(fast) // 2])  # index intact, frame data cut off
    (d / "text.mp4").write_text("this is not a video\n")
    Image.new("RGB", (64, 48), (255, 0, 0)).save(d / "image.mp4", format="PNG")
    make_audio_only(d / "audio.mp4")
    (d / "dir.mp4").mkdir()
    make_video(d / "tiny.mp4", 1, 1, frames=4, pix_fmt="yuv444p")
    os.mkfifo(d / "fifo.mp4")
    return {p.stem: p for p in d.iterdir()}


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("zero", "empty file"),
        ("half", "not a readable video container"),
        ("text", "not a readable video container"),
        ("image", "still image"),
        ("audio", "no video stream"),
        ("dir", "is a directory"),
        ("tiny", r"1×1 is below"),
        ("fifo", "not a regular file"),
    ],
)
def test_bad_input_refused(bad, name, match):
    assert_refused(bad[name], match)


def test_missing_file(tmp_path):
    assert_refused(tmp_path / "nope.mp4", "file not found")


@pytest.mark.parametrize("decoders", [("decord", "pyav"), ("decord",), ("pyav",)])
def test_truncated_with_intact_index(bad, decoders):
    # The index at the start promises 16 frames; the bytes of about half of them are gone. Left alone,
    # decord fails opening it and PyAV would sample the 7 it finds: the index check refuses it for both.
    err = assert_refused(bad["fast_trunc"], r"truncated: \d+ of 16 frames decodable", decoders=decoders)
    n = int(err.reason.split()[1])
    assert 4 <= n <= 8 and err.reason.endswith(f"({100 * n // 16}%)")


@pytest.mark.parametrize(
    ("start", "end", "match"), [(5.0, None, "past the video's end"), (1.0, 0.5, "not after start")]
)
def test_window_outside_video(videos, start, end, match):
    assert_refused(videos["cfr16"], match, start=start, end=end)


def test_unreadable_file(videos):
    d = Path(tempfile.mkdtemp())
    try:
        os.chmod(d, 0o755)
        locked = d / "locked.mp4"
        shutil.copy(videos["cfr16"], locked)
        os.chmod(locked, 0)
        if os.geteuid() != 0:
            assert_refused(locked, "not readable")
            return
        # root reads anything: run the call as `nobody` in a child process to get a real EACCES
        # (imports first: nobody may not be able to read the Python installation).
        code = (
            "import os, time\nfrom data.video import VideoDecodeError, sample_frames\n"
            "os.setgid(65534); os.setuid(65534)\n"
            f"t = time.monotonic()\ntry: sample_frames({str(locked)!r}, timeout_s={TIMEOUT})\n"
            "except VideoDecodeError as e: print('ERR', time.monotonic() - t, e)\n"
        )
        env = {**os.environ, "PYTHONPATH": str(video.REPO_ROOT)}
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
        )
        line = out.stdout.strip()
        assert line.startswith("ERR"), out.stderr[-2000:]
        assert f"{locked}: not readable (Permission denied)" in line
        assert float(line.split()[1]) < TIMEOUT
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_hang_becomes_timeout_and_leaves_nothing_running(tmp_path, videos, monkeypatch):
    argv = write_worker_script(tmp_path / "hang.py", "decord.VideoReader = lambda *a, **k: time.sleep(3600)")
    monkeypatch.setattr(video, "WORKER_ARGV", argv)
    worker = video._worker()
    worker._start()  # start outside the timed region, as a warm worker would be
    pid = worker.proc.pid
    t0 = time.monotonic()
    with pytest.raises(VideoDecodeError, match=r"timed out after 1\.5s"):
        sample_frames(videos["cfr16"], timeout_s=1.5)
    elapsed = time.monotonic() - t0
    assert 1.5 <= elapsed < 1.5 + 2.0
    assert worker.proc is None
    with pytest.raises(ProcessLookupError):  # killed and reaped: no hung (or zombie) process remains
        os.kill(pid, 0)
    monkeypatch.undo()
    assert sample_frames(videos["cfr16"], num_frames=2).decoder == "decord"  # a fresh worker serves again


def test_decord_crash_falls_back_to_pyav(tmp_path, videos, monkeypatch):
    patch = "decord.VideoReader = lambda *a, **k: os.kill(os.getpid(), signal.SIGSEGV)"
    monkeypatch.setattr(video, "WORKER_ARGV", write_worker_script(tmp_path / "crash.py", patch))
    s = sample_frames(videos["cfr16"], num_frames=4, timeout_s=TIMEOUT)
    assert s.decoder == "pyav" and s.indices == [2, 6, 10, 14]


def test_decord_refusal_falls_back_to_pyav_with_same_frames(tmp_path, videos, monkeypatch):
    ref = sample_frames(videos["cfr16"], num_frames=4, size=32)
    patch = "def refuse(*a, **k):\n    raise RuntimeError('decord says no')\ndecord.VideoReader = refuse"
    monkeypatch.setattr(video, "WORKER_ARGV", write_worker_script(tmp_path / "refuse.py", patch))
    s = sample_frames(videos["cfr16"], num_frames=4, size=32)
    assert (ref.decoder, s.decoder) == ("decord", "pyav")
    assert s.indices == ref.indices and s.timestamps == ref.timestamps
    assert (s.frames.float() - ref.frames.float()).abs().mean() < 3  # two ffmpeg builds, same frames


@pytest.mark.parametrize("decoder", ["decord", "pyav"])
def test_odd_size_native_and_resized(videos, decoder):
    s = sample_frames(videos["odd"], num_frames=2, decoders=(decoder,))
    assert tuple(s.frames.shape) == (2, 480, 853, 3)
    f = s.frames[0].float()
    # Green quadrant where it belongs (a stride bug on odd widths would shear it).
    assert f[:230, :420, 1].mean() > 180 and f[250:, 430:, 1].mean() < 20
    r = sample_frames(videos["odd"], num_frames=2, size=(120, 213), decoders=(decoder,))
    assert tuple(r.frames.shape) == (2, 120, 213, 3)


def test_portrait(videos):
    s = sample_frames(videos["portrait"], num_frames=2)
    assert tuple(s.frames.shape) == (2, 854, 480, 3)
    f = s.frames[0].float()
    assert f[:400, :230, 1].mean() > 180 and f[440:, :, 1].mean() < 20  # upright: green at the top
    assert tuple(sample_frames(videos["portrait"], num_frames=2, size=64).frames.shape) == (2, 64, 64, 3)


def test_4k_resized_while_decoding(tmp_path):
    path = make_video(tmp_path / "uhd.mp4", 3840, 2160, frames=2)
    t0 = time.monotonic()
    s = sample_frames(path, num_frames=2, size=224, timeout_s=60)
    assert time.monotonic() - t0 < 30
    assert tuple(s.frames.shape) == (2, 224, 224, 3) and s.indices == [0, 1]
    red = s.frames[:, 150:, 150:, 0].float().mean(dim=(1, 2))
    assert red.tolist() == pytest.approx([frame_level(0), frame_level(1)], abs=4)


def test_bad_arguments_are_value_errors(videos):
    for kw in ({"mode": "random"}, {"mode": "fps"}, {"num_frames": 0}, {"size": 0}):
        with pytest.raises(ValueError):
            sample_frames(videos["cfr16"], **kw)


def test_frames_writable_uint8(videos):
    s = sample_frames(videos["cfr16"], num_frames=3, size=(16, 24))
    assert s.frames.dtype == np.uint8 or str(s.frames.dtype) == "torch.uint8"
    s.frames[0, 0, 0, 0] = 1  # a writable tensor (not a read-only view of the pipe buffer)


def test_worker_that_cannot_start_is_a_clear_error(videos, monkeypatch):
    monkeypatch.setattr(
        video, "WORKER_ARGV", [sys.executable, "-c", "import sys; sys.exit('no decoder here')"]
    )
    t0 = time.monotonic()
    with pytest.raises(VideoDecodeError, match=r"failed to start .*exit 1; no decoder here"):
        sample_frames(videos["cfr16"], timeout_s=TIMEOUT)
    assert time.monotonic() - t0 < TIMEOUT
    assert video._worker().proc is None
