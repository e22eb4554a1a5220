"""Frame sampling from video files: decord `get_batch` of only the sampled frames, bounded by a timeout.

`sample_frames(path, ...)` returns `SampledFrames` or raises `VideoDecodeError("<path>: <reason>")`.
Cheap checks (missing, directory, empty, unreadable) run here; decoding runs in a persistent worker
process (`data.decode_worker`) so that a decord hang or crash can be ended by killing that process:

- per call the worker costs one JSON line each way plus a copy of the frame bytes through a pipe
  (~1 ms for 8 frames at 224 px), not a process start (~0.2 s, paid once per process);
- on timeout the worker is SIGKILLed and reaped, so nothing hung is left behind; the next call
  starts a fresh one;
- each process (e.g. every DataLoader worker after fork) gets its own decode worker.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from data.sampling import check_args

if TYPE_CHECKING:
    import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
# Command that starts the worker; tests swap it for one whose decord hangs, to exercise the timeout.
WORKER_ARGV: list[str] = [sys.executable, "-m", "data.decode_worker"]
STARTUP_TIMEOUT_S = 60.0  # imports of numpy + decord + av; not charged to the first call's timeout


class VideoDecodeError(Exception):
    """A video could not be sampled. str() is '<path>: <one-line reason>'."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


@dataclass
class SampledFrames:
    """Frames sampled from one video, with where they came from."""

    frames: torch.Tensor  # (T, H, W, 3) uint8 RGB
    indices: list[int]  # frame index in the video of each of the T frames (may repeat)
    timestamps: list[float]  # presentation time in seconds (from the first frame) of each frame
    n_unique: int  # distinct frames among the T (< T when the video or window is shorter than T frames)
    decoder: str  # "decord" (our path) or "pyav" (fallback for files decord refuses)
    duration_s: float  # length of the whole video in seconds (of its decodable part if `warning`)
    warning: str | None = None  # set when allow_partial let a truncated file through (names the share)


class _WorkerDied(Exception):
    pass


class DecodeWorker:
    """Parent-side handle of one `data.decode_worker` process; thread-safe, restarted after a kill."""

    def __init__(self, argv: list[str] | None = None) -> None:
        self.argv = list(argv or WORKER_ARGV)
        self.proc: subprocess.Popen | None = None
        self.stderr = None
        self.buf = bytearray()
        self.lock = threading.Lock()

    # --- process lifetime ---------------------------------------------------------------------
    def _start(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        env["KOVICAP_DECODE_PARENT"] = str(os.getpid())
        # A file, not a pipe: an unread pipe could fill up and block the worker. Closed in stop().
        self.stderr = tempfile.TemporaryFile()  # noqa: SIM115
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            env=env,
            start_new_session=True,  # Ctrl-C goes to the parent, which then ends the worker itself
        )
        self.buf.clear()
        try:
            head = json.loads(self._read_line(time.monotonic() + STARTUP_TIMEOUT_S))
            if not head.get("ready"):
                raise _WorkerDied(f"unexpected greeting {head}")
        except (TimeoutError, _WorkerDied, ValueError) as e:
            self.stop()
            raise _WorkerDied(f"decode worker failed to start ({e or 'no answer'})") from None

    def stop(self) -> None:
        """Kill and reap the worker (it holds no state worth a graceful exit)."""
        proc, self.proc = self.proc, None
        if proc is not None:
            proc.kill()
            proc.wait()
            for f in (proc.stdin, proc.stdout):
                f.close()
        if self.stderr is not None:
            self.stderr.close()
            self.stderr = None

    def _stderr_tail(self) -> str:
        if self.stderr is None:
            return ""
        self.stderr.seek(0)
        lines = [x for x in self.stderr.read().decode(errors="replace").splitlines() if x.strip()]
        return lines[-1].strip()[:200] if lines else ""

    # --- pipe I/O with a deadline -------------------------------------------------------------
    def _fill(self, deadline: float) -> None:
        fd = self.proc.stdout.fileno()
        left = deadline - time.monotonic()
        poller = select.poll()  # poll, not select: select fails on fd numbers >= 1024 (busy trainers)
        poller.register(fd, select.POLLIN)
        if left <= 0 or not poller.poll(left * 1000):
            raise TimeoutError
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            code = self.proc.wait()
            tail = self._stderr_tail()
            raise _WorkerDied(f"decoder process died (exit {code}{'; ' + tail if tail else ''})")
        self.buf += chunk

    def _read_line(self, deadline: float) -> bytes:
        while b"\n" not in self.buf:
            self._fill(deadline)
        line, _, rest = bytes(self.buf).partition(b"\n")
        self.buf[:] = rest
        return line

    def _read_exact(self, n: int, deadline: float) -> bytearray:
        while len(self.buf) < n:
            self._fill(deadline)
        out = self.buf[:n]
        del self.buf[:n]
        return out

    def request(self, req: dict, timeout_s: float) -> tuple[dict, np.ndarray | None]:
        """Send one request; raise TimeoutError (worker killed) or _WorkerDied (worker crashed)."""
        with self.lock:
            if self.proc is None or self.proc.poll() is not None:
                self.stop()
                self._start()
            deadline = time.monotonic() + timeout_s
            try:
                self.proc.stdin.write(json.dumps(req).encode() + b"\n")
                self.proc.stdin.flush()
                head = json.loads(self._read_line(deadline))
                frames = None
                if head["ok"]:
                    shape = head["shape"]
                    data = self._read_exact(int(np.prod(shape)), deadline)
                    frames = np.frombuffer(data, dtype=np.uint8).reshape(shape)  # (T, H, W, 3)
                return head, frames
            except BaseException:
                # A hung, dead or interrupted (Ctrl-C mid-answer) worker is never reused: its pipe
                # may hold half an answer.
                self.stop()
                raise


_workers: dict[int, DecodeWorker] = {}  # by pid: a forked child must not share its parent's pipes
_workers_lock = threading.Lock()


def _worker() -> DecodeWorker:
    with _workers_lock:
        w = _workers.get(os.getpid())
        if w is None or w.argv != WORKER_ARGV:
            if w is not None:
                w.stop()
            w = _workers[os.getpid()] = DecodeWorker(WORKER_ARGV)
        return w


def _after_fork_in_child() -> None:
    global _workers_lock
    _workers_lock = threading.Lock()  # the parent may have held it while forking


@atexit.register
def shutdown_workers() -> None:
    """Stop this process's decode worker (called at exit; safe to call any time)."""
    w = _workers.pop(os.getpid(), None)
    if w is not None:
        w.stop()


os.register_at_fork(after_in_child=_after_fork_in_child)


def check_file(path: str | os.PathLike) -> None:
    """Refuse what needs no decoder to refuse: missing, not a regular file, empty, unreadable."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise VideoDecodeError(path, "file not found") from None
    except OSError as e:
        raise VideoDecodeError(path, f"cannot stat ({e.strerror})") from None
    if stat.S_ISDIR(st.st_mode):
        raise VideoDecodeError(path, "is a directory, not a video file")
    if not stat.S_ISREG(st.st_mode):
        # FIFOs and devices would block a decoder forever in open().
        raise VideoDecodeError(path, "not a regular file (FIFO, socket or device)")
    if st.st_size == 0:
        raise VideoDecodeError(path, "empty file (0 bytes)")
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        raise VideoDecodeError(path, f"not readable ({e.strerror})") from None


def _size_hw(size: int | tuple[int, int] | None) -> tuple[int, int]:
    if size is None:
        return 0, 0  # 0: native size
    h, w = (size, size) if isinstance(size, int) else size
    if h < 1 or w < 1:
        raise ValueError(f"size must be positive, got {size!r}")
    return int(h), int(w)


def sample_frames(
    path: str | os.PathLike,
    num_frames: int = 8,
    mode: str = "uniform",
    fps: float | None = None,
    max_frames: int | None = None,
    start: float | None = None,
    end: float | None = None,
    size: int | tuple[int, int] | None = None,
    timeout_s: float = 30.0,
    decoders: tuple[str, ...] = ("decord", "pyav"),
    threads: int = 1,
    allow_partial: bool = False,
) -> SampledFrames:
    """Sample frames from a video; raise VideoDecodeError for any file that cannot be sampled.

    mode="uniform": `num_frames` frames at the midpoints of equal time segments of [start, end).
    mode="fps": one frame per 1/fps s (slot midpoints), uniformly subsampled to `max_frames` if more.
    size: output (height, width), or one int for a square; decord resizes while decoding (no crop,
        aspect ratio not kept: the encoder wants its fixed input size). None keeps the native size.
    timeout_s: wall-clock bound on the whole decode (decord and fallback); on expiry the decode
        process is killed and VideoDecodeError is raised.
    decoders: tried in order until one succeeds. threads: decoder threads per call; 1 because
        DataLoader workers already decode in parallel.
    allow_partial: a truncated file (fewer frames in it than its index promises) is an error
        ("truncated: 29 of 96 frames decodable (30%)") unless this is set; then its decodable part is
        sampled (by PyAV), `duration_s` is that part's, and `warning` carries the same line.
    Frames are upright: a display-matrix rotation (portrait phone clips stored landscape) is applied,
        and `size` is the size of the upright frame.
    Shorter videos/windows than `num_frames` frames repeat the nearest frames; see `n_unique`.
    """
    check_args(num_frames, mode, fps, max_frames)
    h, w = _size_hw(size)
    check_file(path)
    req = {
        "path": os.fspath(Path(path).resolve()),
        "num_frames": num_frames,
        "mode": mode,
        "fps": fps,
        "max_frames": max_frames,
        "start": start,
        "end": end,
        "width": w,
        "height": h,
        "threads": threads,
        "decoders": list(decoders),
        "allow_partial": allow_partial,
    }
    deadline = time.monotonic() + timeout_s
    worker = _worker()
    while True:
        try:
            head, frames = worker.request(req, max(0.0, deadline - time.monotonic()))
            break
        except TimeoutError:
            raise VideoDecodeError(
                path, f"decoding timed out after {timeout_s:g}s (decoder killed)"
            ) from None
        except (_WorkerDied, BrokenPipeError) as e:
            # decord crashed in C (e.g. a segfault on a corrupt file): retry once with what is left.
            req["decoders"] = req["decoders"][1:]
            if not req["decoders"]:
                raise VideoDecodeError(path, str(e) or "decoder process died") from None
    if not head["ok"]:
        raise VideoDecodeError(path, head["error"])
    import torch  # here, not at the top: `import data.video` stays torch-free (torch takes ~3 s)

    return SampledFrames(
        frames=torch.from_numpy(frames),
        indices=head["indices"],
        timestamps=head["timestamps"],
        n_unique=head["n_unique"],
        decoder=head["decoder"],
        duration_s=head["duration"],
        warning=head["warning"],
    )
