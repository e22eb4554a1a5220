"""Finding the videos of a folder, in one order every process agrees on."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".mov", ".avi", ".m4v")


@dataclass(frozen=True)
class Video:
    rel: str  # path relative to the input folder, '/'-separated: the record's `video`
    path: str  # absolute path
    size: int  # bytes (-1 when it cannot be stat'ed: the decode then reports why)
    mtime_ns: int  # with `rel` and `size`: what resume compares


def discover(root: str | os.PathLike) -> tuple[list[Video], list[str]]:
    """(every video-named entry under `root`, sorted by relative path; one line per unreadable folder).

    Recursive, extension case-insensitive. Entries that are not regular files (a directory named x.mp4,
    a FIFO, a dangling link) are listed too: they get an error line instead of vanishing."""
    root = Path(root)
    found, unreadable = [], []

    def failed(err: OSError) -> None:
        where = Path(err.filename).relative_to(root).as_posix() if err.filename else "?"
        unreadable.append(
            f"{where}/: cannot list this folder ({err.strerror}); its videos were not captioned"
        )

    for dirpath, dirnames, filenames in os.walk(root, onerror=failed):
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
    return sorted(found, key=lambda v: v.rel), sorted(unreadable)
