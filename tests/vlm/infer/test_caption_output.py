"""The captions file's owner: lock, refusal of foreign files, overwrite moves aside, damaged lines kept,
torn tails set aside, rank part files folded; nothing it did not write is deleted or rewritten."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from vlm.infer.discover import Video
from vlm.infer.output import CaptionOutput, latest, plan
from vlm.util.errors import UsageError


def rec(video: str, caption: str | None = "캡션", error: str | None = None, **kw) -> dict:
    return {"video": video, "caption": caption, "error": error, "size": 10, "mtime_ns": 5, "model": "kovicap-x",
            "prompt_sha": "abc", **kw}  # fmt: skip


def write(path, *records, tail: str = "") -> bytes:
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records) + tail
    path.write_text(data)
    return data.encode()


def test_a_second_run_is_locked_out_naming_the_holder(tmp_path):
    out = CaptionOutput(tmp_path / "c.jsonl")
    out.lock()
    try:
        code = f"""
import sys; sys.path.insert(0, {str(os.getcwd())!r})
from pathlib import Path
from vlm.infer.output import CaptionOutput
from vlm.util.errors import UsageError
try:
    CaptionOutput(Path({str(tmp_path / "c.jsonl")!r})).lock()
except UsageError as e:
    print(e)
"""
        msg = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        assert f"another run (pid {os.getpid()}) is writing it" in msg
    finally:
        out.release()
    assert not (tmp_path / "c.jsonl.lock").exists()
    out.lock()  # free again
    out.release()


def test_foreign_file_is_refused_and_overwrite_moves_it_aside(tmp_path):
    p = tmp_path / "notes.jsonl"
    p.write_text("my shopping list\n- 우유\n")
    with pytest.raises(UsageError, match=r"holds 2 line\(s\) that are not captions of vlm.caption"):
        CaptionOutput(p).open_for_run(overwrite=False)
    assert p.read_text() == "my shopping list\n- 우유\n"  # untouched
    assert CaptionOutput(p).open_for_run(overwrite=True) == []
    backups = list(tmp_path.glob("notes.jsonl.bak-*"))
    assert len(backups) == 1 and backups[0].read_text() == "my shopping list\n- 우유\n" and not p.exists()


def test_damaged_middle_line_is_kept_and_reported(tmp_path, capsys):
    p = tmp_path / "c.jsonl"
    good = [rec(f"v{i}.mp4") for i in range(40)]
    data = (
        write(p, *good[:17]).decode() + "{garbage line\n" + "".join(json.dumps(r) + "\n" for r in good[17:])
    )
    p.write_text(data)
    records = CaptionOutput(p).open_for_run(overwrite=False)
    assert [r["video"] for r in records] == [r["video"] for r in good]  # nothing after it is dropped
    assert p.read_text() == data  # not rewritten
    assert f"warning: {p}:18: damaged line (not JSON" in capsys.readouterr().err


def test_torn_tail_goes_to_a_sidecar_and_shards_fold_in(tmp_path):
    p = tmp_path / "c.jsonl"
    body = write(p, rec("a.mp4"), rec("b.mp4"), tail='{"video": "c.mp4", "capt')
    (tmp_path / "c.jsonl.rank1.part").write_text(
        json.dumps(rec("a.mp4", "새 캡션")) + "\n" + json.dumps(rec("d.mp4")) + "\n"
    )
    records = CaptionOutput(p).open_for_run(overwrite=False)
    assert [(r["video"], r["caption"]) for r in records] == [
        ("b.mp4", "캡션"),
        ("a.mp4", "새 캡션"),
        ("d.mp4", "캡션"),
    ]
    side = list(tmp_path.glob("c.jsonl.torn-*"))
    assert len(side) == 1 and side[0].read_text() == '{"video": "c.mp4", "capt'
    text = p.read_text()
    assert text.startswith(body[: body.index(b'{"video": "c.mp4"')].decode())  # our complete lines, unchanged
    assert text.count("\n") == 4 and not list(tmp_path.glob("*.part"))


def test_plan_resumes_by_path_size_and_mtime():
    videos = [
        Video("a.mp4", "/x/a.mp4", 10, 5),
        Video("b.mp4", "/x/b.mp4", 10, 6),
        Video("c.mp4", "/x/c.mp4", 10, 5),
    ]
    records = latest([rec("a.mp4"), rec("b.mp4"), rec("c.mp4", None, "broken")])
    todo, done = plan(videos, records, retry_failed=False)
    assert [v.rel for v in todo] == ["b.mp4"] and [v.rel for v in done] == ["a.mp4", "c.mp4"]  # b changed
    todo, _ = plan(videos, records, retry_failed=True)
    assert [v.rel for v in todo] == ["b.mp4", "c.mp4"]
