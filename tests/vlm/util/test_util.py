"""Shared helpers: atomic writes, the always-present link swap, torn-line tolerant JSONL."""

from __future__ import annotations

import json
import os

import pytest

from vlm.util.files import atomic_write, publish_dir, swap_link, temp_dir_beside
from vlm.util.jsonl import append_jsonl, read_jsonl


def test_atomic_write_replaces_whole_and_leaves_no_temp(tmp_path):
    p = tmp_path / "a.json"
    atomic_write(p, "old")
    atomic_write(p, '{"x": 1}')
    assert p.read_text() == '{"x": 1}' and sorted(x.name for x in tmp_path.iterdir()) == ["a.json"]


def test_swap_link_never_leaves_a_moment_without_the_link(tmp_path, monkeypatch):
    a, b = tmp_path / "step_1", tmp_path / "step_2"
    a.mkdir()
    b.mkdir()
    link = tmp_path / "last"
    swap_link(a, link)
    assert link.resolve() == a.resolve() and os.readlink(link) == "step_1"  # relative: the folder can move
    real = os.replace

    def crash(*args):
        raise OSError("power cut")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        swap_link(b, link)
    monkeypatch.setattr(os, "replace", real)
    assert link.resolve() == a.resolve()  # the crash left the old link in place, and no stray temp link
    assert sorted(x.name for x in tmp_path.iterdir()) == ["last", "step_1", "step_2"]
    swap_link(b, link)
    assert link.resolve() == b.resolve()


def test_publish_dir_replaces_only_after_the_new_one_is_whole(tmp_path):
    out = tmp_path / "export"
    tmp = temp_dir_beside(out)
    (tmp / "f").write_text("1")
    publish_dir(tmp, out)
    tmp = temp_dir_beside(out)
    (tmp / "f").write_text("2")
    publish_dir(tmp, out)
    assert (out / "f").read_text() == "2" and sorted(x.name for x in tmp_path.iterdir()) == ["export"]


def test_jsonl_reports_damaged_lines_and_a_torn_tail(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_bytes(b'{"a": 1}\nnot json\n[1, 2]\n\n{"a": 2}\n{"a": 3, "b"')
    c = read_jsonl(p)
    assert c.records == [(1, {"a": 1}), (5, {"a": 2})]
    assert [n for n, _ in c.damaged] == [2, 3] and "not JSON" in c.damaged[0][1] and "list" in c.damaged[1][1]
    assert c.torn == b'{"a": 3, "b"' and c.complete_bytes == len(p.read_bytes()) - len(c.torn)
    with open(p, "a", encoding="utf-8") as f:
        f.truncate(c.complete_bytes)
        append_jsonl(f, [{"a": "한국어"}])
    assert json.loads(p.read_text(encoding="utf-8").splitlines()[-1]) == {"a": "한국어"}
    assert read_jsonl(tmp_path / "absent.jsonl").records == []
