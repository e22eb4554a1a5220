"""Annotation files (JSONL, CSV, captions lists, NFC, path escapes) and the `data.check` CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

from data.annotations import AnnotationError, read_annotations, resolve_video, scan_annotations
from data.check import check_annotations
from data.video import REPO_ROOT

NFD = unicodedata.normalize("NFD", "빨간 원이 움직인다")


@pytest.fixture
def root(tmp_path, videos) -> Path:
    (tmp_path / "clips").mkdir()
    shutil.copy(videos["cfr16"], tmp_path / "clips" / "a.mp4")
    shutil.copy(videos["short3"], tmp_path / "clips" / "b.mp4")
    (tmp_path / "clips" / "broken.mp4").write_text("not a video")
    shutil.copy(videos["cut30"], tmp_path / "clips" / "cut.mp4")
    return tmp_path


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows)
    )
    return path


def test_jsonl_repeated_lines_and_captions_list_merge(root):
    ann = write_jsonl(
        root / "ann.jsonl",
        [
            {"video": "clips/a.mp4", "caption": NFD, "start": 0.0, "end": 1.0},
            {"video": "clips/a.mp4", "caption": "둘째 캡션", "start": 0.0, "end": 1.0},
            {"video": "clips/b.mp4", "captions": ["하나", "둘"], "attributes": {"color": "빨간"}},
            {"video": "clips/a.mp4", "caption": "다른 구간", "start": 1.0},
        ],
    )
    recs = read_annotations(ann, root)
    assert len(recs) == 3
    a = recs[0]
    assert a["captions"] == ["빨간 원이 움직인다", "둘째 캡션"] and a["lines"] == [1, 2]
    assert a["captions"][0] != NFD and unicodedata.is_normalized("NFC", a["captions"][0])
    assert a["video"] == str((root / "clips" / "a.mp4").resolve()) and a["rel"] == "clips/a.mp4"
    assert (a["start"], a["end"]) == (0.0, 1.0)
    assert recs[1]["captions"] == ["하나", "둘"] and recs[1]["attributes"] == {"color": "빨간"}
    assert (recs[2]["start"], recs[2]["end"]) == (1.0, None) and "attributes" not in recs[2]


def test_csv_with_quoted_multiline_caption(root):
    ann = root / "ann.csv"
    ann.write_text(
        "video,caption,start,end,attributes\n"
        'clips/a.mp4,"첫 줄\n둘째 줄",0,1.5,"{""shape"": ""원""}"\n'
        "clips/b.mp4,노란 삼각형,,,\n"
        "clips/b.mp4,,,,\n"
    )
    recs, problems = scan_annotations(ann, root)
    assert [r["captions"] for r in recs] == [["첫 줄\n둘째 줄"], ["노란 삼각형"]]
    assert recs[0]["end"] == 1.5 and recs[0]["attributes"] == {"shape": "원"} and recs[1]["start"] is None
    assert [(p.line, p.message) for p in problems] == [(5, "empty caption")]  # row 3 ends on line 5


@pytest.mark.parametrize("rel", ["../outside.mp4", "clips/../../x.mp4", "/etc/passwd", "~/x.mp4"])
def test_path_escape_rejected(root, rel):
    with pytest.raises(ValueError, match=r"escapes the root|must be relative"):
        resolve_video(root, rel)
    _, problems = scan_annotations(write_jsonl(root / "a.jsonl", [{"video": rel, "caption": "x"}]), root)
    assert len(problems) == 1 and problems[0].line == 1


def test_symlink_out_of_root_rejected(root, tmp_path_factory):
    outside = tmp_path_factory.mktemp("outside")
    (root / "clips" / "link").symlink_to(outside)
    with pytest.raises(ValueError, match="escapes the root"):
        resolve_video(root, "clips/link/x.mp4")


BAD_ROWS = [
    '{"video": "clips/a.mp4", "caption": "좋음"}',  # 1: fine
    '{"video": "clips/a.mp4", "caption": ',  # 2: bad JSON
    '{"caption": "비디오 없음"}',  # 3: missing video
    '{"video": "clips/b.mp4"}',  # 4: missing caption
    '{"video": "clips/b.mp4", "caption": "   "}',  # 5: empty caption
    '{"video": "clips/missing.mp4", "caption": "없는 파일"}',  # 6: missing video file
    '{"video": "clips/broken.mp4", "caption": "깨진 파일"}',  # 7: undecodable
    '{"video": "clips/a.mp4", "caption": "구간 밖", "start": 10.0}',  # 8: window outside the video
    '{"video": "clips/a.mp4", "caption": "거꾸로", "start": 1.0, "end": 0.5}',  # 9: end before start
    "[1, 2]",  # 10: not an object
    '{"video": "../x.mp4", "caption": "탈출"}',  # 11: escapes root
    '{"video": "clips/cut.mp4", "caption": "잘린 파일"}',  # 12: truncated (index promises 96 frames)
]
EXPECTED = [
    (2, "bad JSON"),
    (3, "missing key 'video'"),
    (4, "missing key 'caption'"),
    (5, "empty caption"),
    (6, "video clips/missing.mp4 not found"),
    (7, "video clips/broken.mp4 undecodable: not a readable video container"),
    (8, "video clips/a.mp4 undecodable: window start 10s is past the video's end"),
    (9, "end 0.5 is not after start 1"),
    (10, "expected a JSON object"),
    (11, "escapes the root"),
    (12, "video clips/cut.mp4 undecodable: truncated: "),
]


def test_check_lists_every_problem_with_line(root):
    ann = write_jsonl(root / "bad.jsonl", BAD_ROWS)
    n, problems = check_annotations(ann, root, decode_timeout_s=10)
    assert n == 5  # lines 1, 6, 7, 8, 12 parse into records; the others are annotation problems
    got = [(p.line, p.message) for p in problems]
    assert len(got) == len(EXPECTED)
    for (line, msg), (want_line, want) in zip(got, EXPECTED, strict=True):
        assert line == want_line and want in msg, (line, msg)
    with pytest.raises(AnnotationError, match="line 2: bad JSON"):
        read_annotations(ann, root)


def run_check(*overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "data.check", *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)


def test_check_cli_exit_codes(root):
    bad = write_jsonl(root / "bad.jsonl", BAD_ROWS)
    good = write_jsonl(root / "good.jsonl", [{"video": "clips/a.mp4", "caption": "좋음"}])
    out = run_check(f"annotations={bad}", f"root={root}", "decode_timeout_s=10", "image_size=16")
    assert out.returncode == 1, out.stderr[-2000:]
    lines = [x for x in out.stdout.splitlines() if x.startswith(f"{bad}:")]
    assert [int(x.split(":")[1]) for x in lines] == [line for line, _ in EXPECTED]
    assert f"{len(EXPECTED)} problem(s)" in out.stdout
    ok = run_check(f"annotations={good}")  # root: the annotation file's folder
    assert ok.returncode == 0 and "1 records, 0 problem(s)" in ok.stdout, ok.stderr[-2000:]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["annotations={root}/nope.jsonl"], "annotations={root}/nope.jsonl: no such file"),
        (["annotations={root}/good.jsonl", "root={root}/nope"], "root={root}/nope: no such folder"),
        (["annotations={root}/good.jsonl", "timeout_s=5"], "timeout_s"),  # the old key name is refused
    ],
)
def test_check_cli_usage_errors_are_one_line(root, overrides, message):
    write_jsonl(root / "good.jsonl", [{"video": "clips/a.mp4", "caption": "좋음"}])
    out = run_check(*(o.format(root=root) for o in overrides))
    assert out.returncode == 2, (out.stdout, out.stderr[-2000:])
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert out.stderr.startswith("error: ") and message.format(root=root) in out.stderr
    assert out.stdout == ""
