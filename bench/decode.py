"""Benchmark: sampling 8/16/32 frames from a 60 s 1280×720 H.264 clip, our path vs the naive one.

    python -m bench.decode            (make bench)

- ours: `data.video.sample_frames` — decord reads the index and decodes only the sampled frames with one
  `get_batch`, inside the persistent decode worker (so the pipe copy of the frames is included);
- naive: PyAV decodes the whole stream and keeps the sampled frames (converted to RGB only for those).
Main rows: output 224×224 (the encoder's input: decord resizes while decoding, PyAV resizes the kept
frames); also native 1280×720 output, where ours is slower because decord converts every frame it
decodes to RGB, including those it decodes only to reach a sampled one after a seek.
Both run single-threaded decoders side by side in one run (interleaved, median of `--repeats`), on a
clip this script writes to a temporary folder: 30 fps, keyframe every 2 s (typical of streaming and
phone video). A second clip with x264's default keyframe interval (250 frames, 8.3 s) shows how the
ratio shrinks when each seek must decode a long GOP. It also measures what the hang guard costs per
call (64 px clip, 4 frames): decord in-process vs our persistent worker vs a fresh process per call.
Writes bench/results/decode.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from data.sampling import plan_frames
from data.video import REPO_ROOT, DecodeWorker, sample_frames

RESULTS = REPO_ROOT / "bench" / "results" / "decode.json"
W, H, FPS, SECONDS = 1280, 720, 30, 60


def write_clip(path: Path, gop: int | None) -> Path:
    """60 s of 720p: a drifting blurred texture plus a moving gradient (compresses like real footage)."""
    rng = np.random.default_rng(0)
    small = rng.integers(0, 200, size=(H // 16 + 1, (W + 1024) // 16 + 1, 3), dtype=np.uint8)
    big = np.kron(small, np.ones((16, 16, 1), np.uint8))[:H, : W + 1024]  # (H, W + 1024, 3) blocks
    ramp = (np.arange(W + 1024) % 256 // 4).astype(np.uint8)
    big[..., 2] = big[..., 2] // 2 + ramp[None, :]
    options = {"preset": "ultrafast", "crf": "23"} | ({"g": str(gop)} if gop else {})
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=FPS, options=options)
        s.width, s.height, s.pix_fmt = W, H, "yuv420p"
        for i in range(FPS * SECONDS):
            o = (3 * i) % 1024  # pans 90 px/s: every frame differs
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(big[:, o : o + W]), format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, FPS)
            c.mux(s.encode(frame))
        c.mux(s.encode())
    return path


def naive_pyav(path: Path, num_frames: int, size: int | None) -> np.ndarray:
    """Decode every frame, keep the ones uniform sampling picks (same indices as ours), resized."""
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        s.codec_context.thread_count = 1  # single-threaded like ours (threads=1): compare work, not cores
        n = s.frames
        wanted = plan_frames([i / FPS for i in range(n)], n / FPS, num_frames=num_frames).indices
        keep = {}
        for k, frame in enumerate(c.decode(s)):
            if k in wanted:
                keep[k] = frame.to_ndarray(
                    format="rgb24", **({"width": size, "height": size} if size else {})
                )
    return np.stack([keep[i] for i in wanted])  # (T, H, W, 3)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def compare(path: Path, frame_counts: list[int], repeats: int, size: int | None) -> list[dict]:
    sample_frames(path, num_frames=2)  # start the worker and warm the page cache for both
    rows = []
    for t in frame_counts:
        ours, naive = [], []
        for _ in range(repeats):  # interleaved so both see the same machine load
            ours.append(timed(lambda t=t: sample_frames(path, num_frames=t, size=size, timeout_s=300)))
            naive.append(timed(lambda t=t: naive_pyav(path, t, size)))
        a, b = statistics.median(ours), statistics.median(naive)
        rows.append(
            {
                "frames": t,
                "size": f"{size}×{size}" if size else f"{W}×{H}",
                "ours_s": round(a, 4),
                "naive_s": round(b, 4),
                "ours_fps": round(t / a, 1),
                "naive_fps": round(t / b, 1),
                "speedup": round(b / a, 2),
            }
        )
        print(
            f"  {t:>3} frames  ours {a:7.3f} s ({t / a:6.1f} f/s)  naive {b:7.3f} s ({t / b:5.1f} f/s)  {b / a:5.1f}×"
        )
    return rows


def guard_overhead(tmp: Path, calls: int) -> dict:
    """ms per call for a 64 px, 16-frame clip, 4 frames: what the hang guard adds."""
    import decord

    clip = tmp / "small.mp4"
    with av.open(str(clip), "w") as c:
        s = c.add_stream("libx264", rate=8, options={"preset": "ultrafast"})
        s.width = s.height = 64
        s.pix_fmt = "yuv420p"
        for i in range(16):
            c.mux(
                s.encode(av.VideoFrame.from_ndarray(np.full((64, 64, 3), 10 * i, np.uint8), format="rgb24"))
            )
        c.mux(s.encode())

    def in_process():
        vr = decord.VideoReader(str(clip), num_threads=1)
        vr.get_batch([2, 6, 10, 14]).asnumpy()

    req = {
        "path": str(clip), "num_frames": 4, "mode": "uniform", "fps": None, "max_frames": None,
        "start": None, "end": None, "width": 0, "height": 0, "threads": 1, "decoders": ["decord", "pyav"],
        "allow_partial": False,
    }  # fmt: skip

    def process_per_call():  # the alternative design: start a decode process for every call
        w = DecodeWorker()
        w.request(req, timeout_s=30)
        w.stop()

    sample_frames(clip, num_frames=4)  # worker already warm
    res = {}
    for name, fn, n in (
        ("decord_in_process_ms", in_process, calls),
        ("persistent_worker_ms", lambda: sample_frames(clip, num_frames=4), calls),
        ("process_per_call_ms", process_per_call, 5),
    ):
        res[name] = round(1000 * statistics.median(timed(fn) for _ in range(n)), 2)
    print("  hang guard, per call: " + ", ".join(f"{k} {v}" for k, v in res.items()))
    return res


def machine() -> dict:
    cpu = (
        next(
            (
                x.split(":", 1)[1].strip()
                for x in Path("/proc/cpuinfo").read_text().splitlines()
                if "model name" in x
            ),
            platform.processor(),
        )
        if Path("/proc/cpuinfo").exists()
        else platform.processor()
    )
    import decord

    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "accelerator": "none (CPU-only run; no GPU figures)",
        "platform": platform.platform(),
        "python": platform.python_version(),
        "decord": decord.__version__,
        "av": av.__version__,
        "note": "shared machine: other jobs ran at the same time; ratios are from interleaved runs",
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, nargs="+", default=[8, 16, 32])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    result = {"machine": machine(), "clip": {"width": W, "height": H, "fps": FPS, "seconds": SECONDS}}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for name, gop, sizes in (("gop_2s", 2 * FPS, [224, None]), ("gop_250", None, [224])):
            t0 = time.perf_counter()
            clip = write_clip(tmp / f"{name}.mp4", gop)
            mb = clip.stat().st_size / 1e6
            print(
                f"{name}: {W}×{H} {SECONDS} s H.264 ({mb:.1f} MB, written in {time.perf_counter() - t0:.0f} s)"
            )
            result[name] = {"keyframe_interval": gop or 250, "size_mb": round(mb, 1), "rows": []}
            for size in sizes:
                print(f" output {size or 'native'}:")
                result[name]["rows"] += compare(clip, args.frames, args.repeats, size)
        result["guard_overhead"] = guard_overhead(tmp, calls=30)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
