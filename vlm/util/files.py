"""Atomic files and directories: a reader sees the old bytes or the new ones, never half of either.

- `atomic_write(path, data)`: write a sibling temp file, fsync, rename over `path`.
- `publish_dir(tmp, path)`: put a finished directory at `path`. With `link=True` (training checkpoints'
  `last`), `path` is a symlink swapped with one `os.replace`, so it always names a complete directory;
  otherwise (exports) an existing `path` is renamed aside before the new one is renamed in.
- `temp_dir_beside(path)`: the hidden sibling a directory is built in before `publish_dir`.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, data: str | bytes) -> Path:
    """Replace `path` with `data` (str is written as UTF-8) by temp file + fsync + rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def temp_dir_beside(path: str | os.PathLike) -> Path:
    """A fresh hidden directory next to `path` (same filesystem, so renaming it in is atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    return tmp


def swap_link(target: str | os.PathLike, link: str | os.PathLike) -> None:
    """Point symlink `link` at `target` (relative) in one `os.replace`: never a moment without `link`."""
    target, link = Path(target), Path(link)
    tmp = link.with_name(f".{link.name}.link-{uuid.uuid4().hex[:8]}")
    os.symlink(os.path.relpath(target, link.parent), tmp)
    try:
        os.replace(tmp, link)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(link.parent)


def publish_dir(tmp: Path, path: Path) -> None:
    """Rename the finished directory `tmp` to `path`. An existing directory at `path` is renamed aside
    first and removed only after the new one is in place (the caller was allowed to replace it)."""
    if path.is_symlink() or path.exists():
        old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
        path.rename(old)
        tmp.rename(path)
        if old.is_symlink() or old.is_file():
            old.unlink()
        else:
            shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(path)
    _fsync_dir(path.parent)
