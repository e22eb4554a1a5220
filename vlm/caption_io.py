"""Files of a captioning run: video discovery, the JSONL output (recovery, resume plan), SRT subtitles.

The output is the run's only state. Each line is one video's complete record, keyed for resume by
(`video` = path relative to the input folder, `size`, `mtime_ns`). Lines are appended and flushed
one batch at a time, so after a SIGKILL every complete line is valid and at most the last one is
torn; `recover` drops it. Under DDP each rank appends to its own `<output>.rank<R>.part` file, and
rank 0 folds those into the output at the end (or at the start of the next run, after a kill).
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".mov", ".avi", ".m4v")


class CaptionUsageError(ValueError):
    """Wrong input, checkpoint, output or setting: exit code 2 with this one-line message."""


@dataclass(frozen=True)
class Video:
    rel: str  # path relative to the input folder, '/'-separated: the record's `video`
    path: str  # absolute path
    size: int  # bytes (-1 when it cannot be stat'ed: the decode then reports why)
    mtime_ns: int

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.rel, self.size, self.mtime_ns)


def discover(root: str | os.PathLike) -> list[Video]:
    """Every video-named entry under `root` (recursive, extension case-insensitive), sorted by
    relative path so every process of a run sees the same list in the same order. Entries that are
    not regular files (a directory named x.mp4, a FIFO) are listed too: they get an error line."""
    root = Path(root)
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in [*filenames, *dirnames]:
            if not name.lower().endswith(VIDEO_EXTENSIONS):
                continue
            p = Path(dirpath) / name
            try:
                st = os.stat(p)
            except OSError:  # a dangling symlink: keep it, decoding will say "file not found"
                st = None
            found.append(
                Video(
                    rel=p.relative_to(root).as_posix(),
                    path=str(p.resolve() if st is not None else p.absolute()),
                    size=st.st_size if st is not None and not stat.S_ISDIR(st.st_mode) else -1,
                    mtime_ns=st.st_mtime_ns if st is not None else -1,
                )
            )
    return sorted(found, key=lambda v: v.rel)


# -- the JSONL output -------------------------------------------------------------------------------
def shard_paths(output: Path) -> list[Path]:
    return sorted(output.parent.glob(f"{output.name}.rank*.part"))


def shard_path(output: Path, rank: int) -> Path:
    return output.with_name(f"{output.name}.rank{rank}.part")


def read_lines(path: Path) -> tuple[list[dict[str, Any]], int, bool]:
    """(valid records, byte length of the valid prefix, whether anything after it was dropped).

    Only a torn last line (no newline, or not JSON after a kill) is expected; a bad line in the
    middle ends the valid prefix too, so nothing after it is trusted."""
    if not path.exists():
        return [], 0, False
    data = path.read_bytes()
    records, good = [], 0
    for raw in data.splitlines(keepends=True):
        if not raw.endswith(b"\n"):
            break
        try:
            rec = json.loads(raw)
        except ValueError:
            break
        if not isinstance(rec, dict) or not isinstance(rec.get("video"), str):
            break
        records.append(rec)
        good += len(raw)
    return records, good, good != len(data)


def _write_atomic(path: Path, records: list[dict[str, Any]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def recover(output: Path, redo: set[str] | None = None) -> list[dict[str, Any]]:
    """Make `output` clean: drop a torn tail, fold in rank shards left by a killed run, keep one line
    per video (the latest), drop lines of videos in `redo`. Rewrites the file (atomically) only when
    something changes; returns the records it now holds."""
    records, _, torn = read_lines(output)
    shards = shard_paths(output)
    for s in shards:
        records += read_lines(s)[0]
    latest: dict[str, dict[str, Any]] = {}
    for r in records:
        latest.pop(r["video"], None)  # re-insert: a later line wins and moves to the end
        latest[r["video"]] = r
    kept = [r for v, r in latest.items() if v not in (redo or set())]
    if torn or shards or len(kept) != len(records):
        _write_atomic(output, kept)
    for s in shards:
        s.unlink()
    return kept


def plan(
    videos: list[Video], records: list[dict[str, Any]], retry_failed: bool
) -> tuple[list[Video], list[Video], set[str]]:
    """(to caption, already done, relative paths whose old line must go) for this run."""
    by_rel = {r["video"]: r for r in records}
    todo, done, redo = [], [], set()
    for v in videos:
        r = by_rel.get(v.rel)
        same = r is not None and (r.get("size"), r.get("mtime_ns")) == (v.size, v.mtime_ns)
        if same and (r.get("error") is None or not retry_failed):
            done.append(v)
            continue
        todo.append(v)
        if r is not None:  # changed since, or failed and retried: the new line replaces it
            redo.add(v.rel)
    return todo, done, redo


def check_compatible(records: list[dict[str, Any]], output: Path, expect: dict[str, Any]) -> None:
    """Refuse to mix captions of another model, prompt or segmentation into one output file."""
    for r in records:
        for k, want in expect.items():
            if k in r and r[k] != want:
                raise CaptionUsageError(
                    f"{output}: holds lines with {k}={r[k]!r} but this run has {k}={want!r}; "
                    "use another output file (or delete this one)"
                )


# -- SRT ----------------------------------------------------------------------------------------------
def srt_time(seconds: float) -> str:
    ms = round(max(0.0, seconds) * 1000)
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d},{ms:03d}"


def srt_text(segments: list[dict[str, Any]]) -> str:
    """Numbered cues; a caption's line breaks become spaces (a blank line would end the cue)."""
    blocks = [
        f"{i}\n{srt_time(s['start'])} --> {srt_time(s['end'])}\n{' '.join((s['caption'] or '').split()) or '…'}\n"
        for i, s in enumerate(segments, 1)
    ]
    return "\n".join(blocks)


def srt_dir(output: Path) -> Path:
    """Subtitles go beside the output: captions.jsonl → captions_srt/<relative path>.srt."""
    return output.with_name(f"{output.stem}_srt")


def write_srt(output: Path, rel: str, segments: list[dict[str, Any]]) -> Path:
    path = srt_dir(output) / Path(rel).with_suffix(".srt")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(srt_text(segments), encoding="utf-8")
    os.replace(tmp, path)
    return path


def parse_srt(text: str) -> list[tuple[float, float, str]]:
    """(start, end, text) per cue; strict enough to catch a malformed file."""

    def sec(t: str) -> float:
        hms, ms = t.split(",")
        h, m, s = (int(x) for x in hms.split(":"))
        return h * 3600 + m * 60 + s + int(ms) / 1000

    cues = []
    for i, block in enumerate(text.strip().split("\n\n"), 1):
        lines = block.split("\n")
        if len(lines) < 3 or lines[0] != str(i) or " --> " not in lines[1]:
            raise ValueError(f"SRT cue {i} is malformed: {block!r}")
        a, b = lines[1].split(" --> ")
        cues.append((sec(a), sec(b), "\n".join(lines[2:])))
    return cues
