"""The captions file and its one owner: locked, resumed, appended to, never rewritten.

The output is a run's only state: one JSON line per video, keyed for resume by (`video` = path relative
to the input folder, `size`, `mtime_ns`); a later line for the same video supersedes an earlier one.
- A run holds an exclusive lock (`<output>.lock`, with its pid) while it writes; a second run on the
  same output stops at once naming the holder.
- A file that is not a captions file of ours is refused unless `overwrite=true`, which moves it aside
  to `<output>.bak-<time>` (nothing is deleted).
- A damaged line in the middle is reported with its line number and kept; its video is captioned again.
- Only a torn last line (no newline: a writer was killed mid-line) is set aside, moved to
  `<output>.torn-<time>`, so the next line starts clean.
- Under DDP each rank appends to its own `<output>.rank<R>.part`; rank 0 appends those lines to the
  output at the end (or at the start of the next run, after a kill) and removes the part files.
"""

from __future__ import annotations

import fcntl
import os
import sys
import time
from pathlib import Path
from typing import IO, Any

from vlm.infer.discover import Video
from vlm.util.errors import UsageError
from vlm.util.jsonl import append_jsonl, read_jsonl

# Fields every line of ours carries, with their types (captions and errors may be null).
SCHEMA: dict[str, tuple[type, ...]] = {
    "video": (str,), "caption": (str, type(None)), "error": (str, type(None)), "size": (int,),
    "mtime_ns": (int,), "model": (str,), "prompt_sha": (str,),
}  # fmt: skip


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def is_record(obj: dict[str, Any]) -> bool:
    return all(isinstance(obj.get(k), t) for k, t in SCHEMA.items())


def shard_path(output: Path, rank: int) -> Path:
    return output.with_name(f"{output.name}.rank{rank}.part")


def shard_paths(output: Path) -> list[Path]:
    return sorted(output.parent.glob(f"{output.name}.rank*.part"))


def _stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


class CaptionOutput:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock_path = path.with_name(f"{path.name}.lock")
        self._lock: IO[str] | None = None

    # -- the lock ----------------------------------------------------------------------------------
    def lock(self) -> None:
        """Take the exclusive lock or raise UsageError naming the run that holds it."""
        f = open(self.lock_path, "a+", encoding="utf-8")  # noqa: SIM115 (held until release)
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "?"
            f.close()
            raise UsageError(
                f"output={self.path}: another run (pid {holder}) is writing it; wait for it or pick another output"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        self._lock = f

    def release(self) -> None:
        if self._lock is not None:
            self.lock_path.unlink(missing_ok=True)  # ours: written by this run
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    # -- reading and repairing ---------------------------------------------------------------------
    def open_for_run(self, overwrite: bool) -> list[dict[str, Any]]:
        """Check the file is ours (or move it aside with `overwrite`), set a torn tail aside, fold
        leftover rank shards in; return its records, one per video (the latest)."""
        if self.path.is_dir():
            raise UsageError(f"output={self.path}: is a directory; give a .jsonl file path")
        contents = read_jsonl(self.path)
        ours = [(n, r) for n, r in contents.records if is_record(r)]
        foreign = [n for n, r in contents.records if not is_record(r)]
        if overwrite and self.path.exists() and self.path.stat().st_size:
            backup = self.path.with_name(f"{self.path.name}.bak-{_stamp()}")
            self.path.rename(backup)
            warn(f"overwrite=true: the old {self.path.name} was moved to {backup.name}")
            return self._fold_shards([])
        if (contents.records or contents.damaged) and not ours:
            n = len(contents.records) + len(contents.damaged)
            raise UsageError(
                f"output={self.path}: holds {n} line(s) that are not captions of vlm.caption; "
                "use another output, or overwrite=true (the file is then moved aside, not deleted)"
            )
        for n in foreign:
            warn(f"{self.path}:{n}: a JSON line without the captions fields; kept, and ignored for resume")
        for n, reason in contents.damaged:
            warn(f"{self.path}:{n}: damaged line ({reason}); kept, and its video is captioned again")
        if contents.torn:
            aside = self.path.with_name(f"{self.path.name}.torn-{_stamp()}")
            aside.write_bytes(contents.torn)
            with open(
                self.path, "r+b"
            ) as f:  # the torn bytes were our own killed run's; they are kept in `aside`
                f.truncate(contents.complete_bytes)
                os.fsync(f.fileno())
            warn(f"{self.path}: a torn last line (a killed run) was moved to {aside.name}")
        return self._fold_shards([r for _, r in ours])

    def _fold_shards(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return latest(records + self.fold_shards())

    def fold_shards(self) -> list[dict[str, Any]]:
        """Append every rank's part-file lines to the output and remove the part files (written by a
        run of ours); returns the lines they held."""
        shards = shard_paths(self.path)
        new: list[dict[str, Any]] = []
        if shards:
            with open(self.path, "a", encoding="utf-8") as f:
                for s in shards:
                    lines = [r for r in read_jsonl(s).objects if is_record(r)]
                    append_jsonl(f, lines)
                    new += lines
                    s.unlink()
        return new

    def appender(self, rank: int, world: int) -> IO[str]:
        """The file this rank appends to (the output itself, or its shard under DDP)."""
        target = self.path if world == 1 else shard_path(self.path, rank)
        return open(target, "a", encoding="utf-8")


def latest(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per video: the last line wins."""
    by_video: dict[str, dict[str, Any]] = {}
    for r in records:
        by_video.pop(r["video"], None)
        by_video[r["video"]] = r
    return list(by_video.values())


def plan(
    videos: list[Video], records: list[dict[str, Any]], retry_failed: bool
) -> tuple[list[Video], list[Video]]:
    """(to caption, already done) for this run: done means a line with the same path, size and mtime
    (and no error, unless failures are not being retried)."""
    by_rel = {r["video"]: r for r in records}
    todo, done = [], []
    for v in videos:
        r = by_rel.get(v.rel)
        same = r is not None and (r["size"], r["mtime_ns"]) == (v.size, v.mtime_ns)
        (done if same and (r["error"] is None or not retry_failed) else todo).append(v)
    return todo, done


def check_compatible(records: list[dict[str, Any]], output: Path, expect: dict[str, Any]) -> None:
    """Refuse to mix captions of another model, prompt or segmentation into one output file."""
    for r in records:
        for k, want in expect.items():
            if k in r and r[k] != want:
                raise UsageError(
                    f"output={output}: holds lines with {k}={r[k]!r} but this run has {k}={want!r}; "
                    "use another output file, or overwrite=true (the old file is moved aside)"
                )
