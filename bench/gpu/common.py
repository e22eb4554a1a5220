"""What every part of the GPU kit shares: the JSON record written after each step, machine facts, timing.

A part writes `<results>/<part>.json` through `Record`: every `set` rewrites the file atomically, so a
part stopped at its time limit (or crashed) leaves everything it measured so far; `guard(key)` turns an
exception into an error record under `key` and carries on with the next measurement.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
H200_BF16_FLOPS = 790e12  # dense bf16 matmul, measured on these machines (KINDS.md: 769-798 TFLOP/s)
H200_BYTES_PER_S = 4.3e12  # HBM3e device-to-device copy, measured likewise
MIB = 2**20


class Record:
    """A JSON object mirrored to `path` after every change."""

    def __init__(self, path: Path, **initial: Any) -> None:
        self.path, self.data = path, dict(initial)
        self.flush()

    def set(self, key: str, value: Any) -> None:
        self.data[key] = value
        self.flush()

    def flush(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str) + "\n")
        tmp.replace(self.path)

    @contextlib.contextmanager
    def guard(self, key: str) -> Iterator[None]:
        """Run a measurement; on an exception record {"error": ...} under `key` and continue."""
        try:
            yield
        except Exception as e:  # one failure must not lose the other measurements
            self.set(key, error_record(e))


def error_record(e: BaseException) -> dict[str, str]:
    return {"error": f"{type(e).__name__}: {e}"[:2000], "traceback": traceback.format_exc()[-4000:]}


class Deadline:
    """Seconds left to a part; measurements check it between items and record what they skipped."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def over(self, reserve: float = 0.0) -> bool:
        return self.left() < reserve


SKIPPED = {"skipped": "the part's time limit was reached before this measurement"}


def cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def device() -> str:
    return "cuda" if cuda() else "cpu"


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset_peak() -> int:
    """Free cached blocks, reset the peak counter; returns the bytes allocated now (0 on CPU)."""
    import gc

    import torch

    gc.collect()
    if not torch.cuda.is_available():
        return 0
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def peak() -> dict[str, int | None]:
    """max_memory_allocated / max_memory_reserved since the last reset (None on CPU: not measured)."""
    import torch

    if not torch.cuda.is_available():
        return {"max_memory_allocated": None, "max_memory_reserved": None}
    torch.cuda.synchronize()
    return {
        "max_memory_allocated": torch.cuda.max_memory_allocated(),
        "max_memory_reserved": torch.cuda.max_memory_reserved(),
    }


def interleaved_ms(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, Any]:
    """Median (and min/max) milliseconds of each fn, the fns run in turn `repeats` times (shared noise)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {n: [] for n in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            samples[name].append((time.perf_counter() - t0) * 1e3)
    return {
        n: {"median_ms": statistics.median(v), "min_ms": min(v), "max_ms": max(v), "runs": len(v)}
        for n, v in samples.items()
    }


def _version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def machine() -> dict[str, Any]:
    """Where and with what the run happened: date, host, GPU, driver-side CUDA, package versions, commit."""
    import torch

    gpu = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        gpu = {"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
               "capability": f"{p.major}.{p.minor}", "multiprocessors": p.multi_processor_count}  # fmt: skip
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "date_utc": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S"),
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "gpu": gpu,
        "cuda": torch.version.cuda,
        "commit": commit,
        "versions": {
            n: _version(n)
            for n in (
                "torch",
                "triton",
                "transformers",
                "peft",
                "bitsandbytes",
                "open_clip_torch",
                "lightning",
                "hydra-core",
            )
        },
    }
