"""The decode worker: a long-lived child process that runs decord (and the PyAV fallback) for `data.video`.

decord can hang or crash inside C code on some corrupt files, and a thread stuck in C cannot be
stopped. So every decode runs here, in a separate process that the parent kills when a call runs past
its timeout (and restarts on the next call). Starting a Python process costs ~0.2 s, so the worker is
kept alive between calls instead of being spawned per call; it imports numpy, decord and av, never torch.

Protocol (no pickle): the parent writes one JSON request per line on stdin; the worker answers with one
JSON header line on stdout and, on success, the frames as raw uint8 bytes of the shape in the header.
Run as `python -m data.decode_worker`; it exits when stdin closes or its parent dies.

Two properties hold whichever decoder serves a call:
- frames are upright: a phone's portrait clip is often stored landscape with a display-matrix rotation.
  decord (0.6.0 wheels) applies that matrix itself, before its resize (tests/data pin this); PyAV does
  not, so its frames are turned here with np.rot90 (and resized to the transposed size first);
- truncation is never silent: `probe` compares what the container's index promises with the bytes the
  file holds (no decoding) and refuses a file that falls short, or, with `allow_partial`, samples the
  decodable part with PyAV and says so in the answer's `warning`.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np

from data.sampling import FramePlan, WindowError, plan_frames

# Container formats that ffmpeg opens as a single still image: a picture renamed to .mp4 is not a video.
IMAGE_FORMATS = ("image2", "png_pipe", "jpeg_pipe", "bmp_pipe", "webp_pipe", "tiff_pipe", "pgm_pipe")
MIN_SIDE = 8  # px; smaller frames (1×1 …) carry nothing an encoder can use, and decord mis-copies them


class DecodeFailure(Exception):
    """A one-line reason why this file cannot be sampled (sent back to the parent as text)."""


class WindowFailure(DecodeFailure):
    """The start/end window does not overlap the video: no other decoder would do better."""


def one_line(err: BaseException | str, limit: int = 200) -> str:
    """First meaningful line of an error, without decord's '[time] /src/file.cc:123: ' prefix."""
    text = str(err).strip() or type(err).__name__
    line = next((x.strip() for x in text.splitlines() if x.strip()), text)
    if line.startswith("[") and "] " in line:
        line = line.split("] ", 1)[1]
    if ".cc:" in line and ": " in line:
        line = line.split(": ", 1)[1]
    return line[:limit]


@dataclass
class Probe:
    """What the container headers say about a file, read without decoding."""

    format: str
    width: int  # stored size (before any display rotation)
    height: int
    promised: int  # frames the container's index/header promises (0: none promised, e.g. MPEG-TS, MKV)
    present: int  # of those, how many (in decode order, from the first) have all their bytes in the file

    def truncation(self) -> str | None:
        """A one-line reason if the file holds fewer frames than promised, else None."""
        if self.present >= self.promised:
            return None
        share = 100 * self.present // self.promised  # floor: a short file never reads as 100%
        return f"truncated: {self.present} of {self.promised} frames decodable ({share}%)"


def frames_present(container: Any, stream: Any, file_size: int) -> tuple[int, int]:
    """(frames promised, frames whose bytes are in the file), cheaply.

    mp4/mov (and AVI with its idx1) list every frame's byte range in an index read with the headers:
    checking it costs ~1 ms for 1800 frames and no I/O. A faststart mp4 cut short keeps that index, so
    the frames past the end of the file are counted as missing. Without a full index (the index was
    rebuilt from what is left), the packets are demuxed, not decoded (~35 ms for 55 MB, page-cached).
    """
    promised = stream.frames
    if promised <= 0:
        return 0, 0  # nothing promised (MPEG-TS, most MKV): nothing to fall short of
    entries = stream.index_entries
    if len(entries) == promised and all(e.pos >= 0 for e in entries):
        ends = [e.pos + e.size for e in entries]  # decode order
        return promised, next((k for k, end in enumerate(ends) if end > file_size), promised)
    n = sum(1 for p in container.demux(stream) if p.size > 0)
    # The demuxer hands out the last packet cut at the end of the file as if whole: do not count it.
    return promised, n if n >= promised else max(0, n - 1)


def probe(path: str) -> Probe:
    """Read container headers with PyAV (~1.5 ms, +1 ms per 1800 indexed frames): is there a usable
    video stream, and are all the frames its index promises in the file?"""
    import av

    try:
        with av.open(path) as c:
            fmt = c.format.name
            kinds = sorted({s.type for s in c.streams})
            if fmt in IMAGE_FORMATS:
                raise DecodeFailure(f"is a still image ({fmt}), not a video")
            if not c.streams.video:
                raise DecodeFailure(f"has no video stream (streams: {', '.join(kinds) or 'none'})")
            s = c.streams.video[0]
            width, height = s.codec_context.width, s.codec_context.height
            if min(width, height) < MIN_SIDE:
                raise DecodeFailure(f"frame size {width}×{height} is below the {MIN_SIDE} px minimum")
            promised, present = frames_present(c, s, os.path.getsize(path))
    except DecodeFailure:
        raise
    except Exception as e:  # av raises many error types (InvalidDataError, EOFError, ...)
        why = getattr(e, "strerror", None) or one_line(e)  # strerror: av's reason without the path again
        raise DecodeFailure(f"not a readable video container ({why})") from e
    return Probe(fmt, width, height, promised, present)


def plan_from_request(req: dict[str, Any], pts: list[float], duration: float) -> FramePlan:
    try:
        return plan_frames(
            pts,
            duration,
            num_frames=req["num_frames"],
            mode=req["mode"],
            fps=req["fps"],
            max_frames=req["max_frames"],
            start=req["start"],
            end=req["end"],
        )
    except WindowError as e:
        raise WindowFailure(str(e)) from e


def decode_decord(req: dict[str, Any]) -> tuple[np.ndarray, FramePlan, float]:
    """Our path: read the frame index, pick frames, decode only those with one get_batch (resized)."""
    import decord

    w, h = req["width"] or -1, req["height"] or -1  # -1: decord keeps the native size
    vr = decord.VideoReader(req["path"], ctx=decord.cpu(0), width=w, height=h, num_threads=req["threads"])
    n = len(vr)
    if n == 0:
        raise DecodeFailure("video stream has no frames")
    ts = vr.get_frame_timestamp(np.arange(n))  # (n, 2): start and end of each frame in seconds
    t0 = float(ts[0, 0])
    # decord keeps float32 seconds: round to the µs so both decoders report the same times.
    pts = [round(float(t) - t0, 6) for t in ts[:, 0]]
    duration = round(float(ts[-1, 1]) - t0, 6)
    plan = plan_from_request(req, pts, duration)
    unique = sorted(set(plan.indices))
    batch = vr.get_batch(unique).asnumpy()  # (U, H, W, 3) uint8
    pos = {idx: k for k, idx in enumerate(unique)}
    frames = batch[[pos[i] for i in plan.indices]]  # (T, H, W, 3): repeats restored
    return frames, plan, duration


def upright(frame: Any, width: int, height: int) -> np.ndarray:
    """A PyAV frame as (H, W, 3) RGB, turned by its display matrix; width/height (0: native) are upright."""
    k = round(frame.rotation / 90) % 4  # counter-clockwise quarter turns, as np.rot90 counts them
    if width and k % 2:
        width, height = height, width  # resize the stored picture to the size that becomes (H, W)
    size = {"width": width, "height": height} if width else {}
    return np.rot90(frame.to_ndarray(format="rgb24", **size), k)


def decoded(container: Any, stream: Any, limit: int | None) -> Iterator[Any]:
    """Frames of `stream` decoded from its first `limit` packets (all if None), the decoder flushed.

    Stopping before the cut-off packet of a truncated file keeps its partial bytes out of the decoder.
    """
    n = 0
    for packet in container.demux(stream):
        if packet.size > 0:
            if n == limit:
                yield from stream.codec_context.decode(None)  # flush: frames held back for reordering
                return
            n += 1
        yield from packet.decode()  # demux ends with an empty packet, which flushes the decoder


def decode_pyav(req: dict[str, Any], limit: int | None = None) -> tuple[np.ndarray, FramePlan, float]:
    """Fallback: demux packets for the timestamps, then decode in order up to the last frame needed.

    limit: use only the first `limit` packets in decode order (the decodable part of a truncated file).
    """
    import av

    path = req["path"]
    with av.open(path) as c:
        s = c.streams.video[0]
        tb = s.time_base or Fraction(1, 90000)
        packets = [(p.pts, p.duration or 0) for p in c.demux(s) if p.pts is not None and p.size > 0]
    packets = packets[:limit]
    if not packets:
        raise DecodeFailure("video stream has no frames")
    packets.sort()
    raw = [p for p, _ in packets]
    t0 = raw[0]
    pts = [round(float((p - t0) * tb), 6) for p in raw]
    last_dur = packets[-1][1] or (raw[-1] - raw[-2] if len(raw) > 1 else 0)
    duration = round(float((raw[-1] + last_dur - t0) * tb), 6) or 1e-3
    plan = plan_from_request(req, pts, duration)
    wanted = set(plan.indices)
    index_of = {p: k for k, p in enumerate(raw)}
    got: dict[int, np.ndarray] = {}
    with av.open(path) as c:
        s = c.streams.video[0]
        s.thread_type = "AUTO"
        for k, frame in enumerate(decoded(c, s, limit)):
            idx = index_of.get(frame.pts, k) if frame.pts is not None else k
            if idx in wanted:
                got[idx] = upright(frame, req["width"], req["height"])  # (H, W, 3)
            if len(got) == len(wanted) or idx > max(wanted):
                break
    missing = wanted - got.keys()
    if missing:
        raise DecodeFailure(f"stream ended before frame {min(missing)} of {len(raw)} (truncated?)")
    return np.stack([got[i] for i in plan.indices]), plan, duration


def handle(req: dict[str, Any]) -> tuple[dict[str, Any], np.ndarray | None]:
    """One request -> (header, frames). decord first; PyAV if decord raises (a crash kills us instead)."""
    try:
        info = probe(req["path"])
        decoders, limit, warning = req["decoders"], None, info.truncation()
        if warning is not None:
            if not req["allow_partial"] or info.present == 0:
                raise DecodeFailure(warning)
            # decord indexes the whole file when it opens it and fails on the missing bytes (or would
            # sample frames that are not there); PyAV decodes the part that is.
            decoders, limit = [d for d in decoders if d != "decord"], info.present
            if not decoders:
                raise DecodeFailure(f"{warning}; only the pyav decoder reads the decodable part")
        errors = []
        for name in decoders:
            try:
                if name == "decord":
                    frames, plan, duration = decode_decord(req)
                else:
                    frames, plan, duration = decode_pyav(req, limit)
            except WindowFailure:
                raise  # the window is wrong whichever decoder reads the file
            except DecodeFailure as e:
                errors.append(f"{name}: {e}")
            except Exception as e:  # decord raises DECORDError / RuntimeError with multi-line traces
                errors.append(f"{name}: {one_line(e)}")
            else:
                frames = np.ascontiguousarray(frames, dtype=np.uint8)
                head = {
                    "ok": True,
                    "shape": list(frames.shape),
                    "indices": plan.indices,
                    "timestamps": plan.timestamps,
                    "n_unique": plan.n_unique,
                    "duration": duration,
                    "decoder": name,
                    "warning": warning,
                }
                return head, frames
        raise DecodeFailure("undecodable (" + "; ".join(errors) + ")")
    except DecodeFailure as e:
        return {"ok": False, "error": one_line(str(e), 400)}, None


def _die_with_parent() -> None:
    """Linux: get SIGKILL when the parent dies, so a worker hung in decord never outlives its job."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the stdin-EOF exit below still applies when the parent closes the pipe
    parent = os.environ.get("KOVICAP_DECODE_PARENT")
    if parent and os.getppid() != int(parent):
        os._exit(0)  # the parent died before prctl took effect


def main() -> None:
    _die_with_parent()
    # Keep the protocol stream private: C libraries that print to fd 1 would corrupt it otherwise.
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    import av  # noqa: F401  (import both decoders before saying ready, so calls are not charged for it)
    import decord  # noqa: F401

    out.write(b'{"ready": true}\n')
    out.flush()
    for line in sys.stdin.buffer:
        head, frames = handle(json.loads(line))
        out.write(json.dumps(head).encode() + b"\n")
        if frames is not None:
            out.write(memoryview(frames).cast("B"))
        out.flush()


if __name__ == "__main__":
    main()
