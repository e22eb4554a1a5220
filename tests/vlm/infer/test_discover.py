"""Finding the videos: an unreadable subfolder is one line, not a silent gap."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from vlm.infer.discover import discover


def test_an_unreadable_subfolder_is_reported_not_skipped_silently(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "ok").mkdir()
    (tmp_path / "ok" / "a.mp4").write_bytes(b"x")
    (tmp_path / "locked").mkdir()
    (tmp_path / "locked" / "b.MP4").write_bytes(b"x")
    real = os.scandir

    def scandir(path=".", *a, **k):  # chmod 000 cannot stop root (CI runs as root): refuse by path
        if Path(path) == tmp_path / "locked":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
        return real(path, *a, **k)

    monkeypatch.setattr(os, "scandir", scandir)
    videos, unreadable = discover(tmp_path)
    assert [v.rel for v in videos] == ["ok/a.mp4"]
    assert unreadable == [
        "locked/: cannot list this folder (Permission denied); its videos were not captioned"
    ]
