"""The synthetic Korean corpus: particles, captions <-> attributes, and properties of the rendered clips."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest

from data.korean import COLORS, MOTIONS, SHAPES, TEMPLATES, eun_neun, euro, i_ga, make_caption
from data.synth import VOCAB, generate, parse_attributes
from data.video import REPO_ROOT, sample_frames

N_TRAIN, N_VAL = 48, 24


def read(root: Path, split: str) -> list[dict]:
    return [json.loads(x) for x in (root / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    generate(out, n_train=N_TRAIN, n_val=N_VAL, seed=0, workers=1)
    return out


def frames4(root: Path, row: dict) -> np.ndarray:
    return sample_frames(
        root / row["video"], num_frames=4
    ).frames.numpy()  # (4, 64, 64, 3), as the demo sees it


def test_particles_follow_batchim():
    assert [i_ga(w) for w in ("원", "사각형", "삼각형", "하나", "고양이")] == [
        "원이",
        "사각형이",
        "삼각형이",
        "하나가",
        "고양이가",
    ]
    assert [eun_neun(w) for w in ("원", "하나")] == ["원은", "하나는"]
    # 으로 after a batchim, 로 after a vowel or ㄹ
    assert [euro(w) for w in ("오른쪽", "왼쪽", "아래", "위", "서울")] == [
        "오른쪽으로",
        "왼쪽으로",
        "아래로",
        "위로",
        "서울로",
    ]
    with pytest.raises(ValueError):
        i_ga("circle")


def test_vocab_is_the_documented_one():
    assert VOCAB == {
        "color": ("빨간", "파란", "초록", "노란"),
        "shape": ("원", "사각형", "삼각형"),
        "motion": ("왼쪽에서 오른쪽으로", "오른쪽에서 왼쪽으로", "위에서 아래로", "아래에서 위로"),
    }


def test_parse_recovers_every_meaning_from_every_template():
    for (c, s, m), t in itertools.product(itertools.product(COLORS, SHAPES, MOTIONS), range(len(TEMPLATES))):
        caption = make_caption(c, s, m, t)
        assert parse_attributes(caption) == {"color": c, "shape": s, "motion": m}, caption
        assert parse_attributes(unicodedata.normalize("NFD", caption))["shape"] == s


@pytest.mark.parametrize(
    ("caption", "expected"),
    [
        (
            "초록색 원이 천천히 아래에서 위로 움직입니다",
            {"color": "초록", "shape": "원", "motion": "아래에서 위로"},
        ),
        ("빨간 원과 파란 원이 움직인다.", {"color": None, "shape": "원", "motion": None}),  # two colours
        ("원래 아무것도 없다", {"color": None, "shape": None, "motion": None}),  # 원래 is not 원
        ("", {"color": None, "shape": None, "motion": None}),
    ],
)
def test_parse_model_like_outputs(caption, expected):
    assert parse_attributes(caption) == expected


def test_corpus_files_captions_attributes(corpus):
    for split, n in (("train", N_TRAIN), ("val", N_VAL)):
        rows = read(corpus, split)
        assert len(rows) == n
        for row in rows:
            assert (
                row["video"] == f"videos/{split}/{row['video'][-10:]}" and (corpus / row["video"]).is_file()
            )
            assert unicodedata.is_normalized("NFC", row["caption"])
            assert parse_attributes(row["caption"]) == row["attributes"]
    train = read(corpus, "train")
    # balanced: the first 48 train clips hold each attribute triple exactly once
    triples = {tuple(r["attributes"].values()) for r in train[:48]}
    assert len(triples) == 48
    assert len({r["caption"] for r in train}) > 48 // 2  # several paraphrases are in use


def _mask(frame: np.ndarray) -> np.ndarray:
    f = frame.astype(int)
    return (f.max(-1) - f.min(-1)) > 80  # saturated pixels: the shape (backgrounds are grey-ish, dark)


def test_clips_show_their_colour_size_and_motion(corpus):
    for row in read(corpus, "train") + read(corpus, "val"):
        frames = frames4(corpus, row)
        a = row["attributes"]
        centres = []
        for f in frames:
            m = _mask(f)
            ys, xs = np.nonzero(m)
            assert m.sum() > 0.06 * 64 * 64, row  # large shape (even when partly past the edge)
            mean = f[m].mean(0)
            nearest = min(COLORS, key=lambda c: np.abs(mean - np.array(COLORS[c])).sum())
            assert nearest == a["color"], (row, mean)
            centres.append((xs.mean(), ys.mean()))
        (x0, y0), (x1, y1) = centres[0], centres[-1]
        dx, dy = MOTIONS[a["motion"]]
        along = (x1 - x0) * dx + (y1 - y0) * dy
        across = abs((x1 - x0) * dy) + abs((y1 - y0) * dx)
        assert along > 0.3 * 64 and across < 0.15 * 64, (row, centres)  # moves far, in the stated direction
        full = _mask(frames[1])  # the 2nd sampled frame is well inside the frame
        ys, xs = np.nonzero(full)
        assert ys.max() - ys.min() + 1 >= 0.3 * 64, row


def test_deterministic_by_seed_and_train_val_differ(corpus, tmp_path):
    again = tmp_path / "again"
    generate(again, n_train=N_TRAIN, n_val=N_VAL, seed=0, workers=2)  # worker count must not matter
    for split in ("train", "val"):
        assert (again / f"{split}.jsonl").read_bytes() == (corpus / f"{split}.jsonl").read_bytes()
    for row in read(corpus, "train")[:12]:
        diff = np.abs(frames4(corpus, row).astype(int) - frames4(again, row).astype(int)).mean()
        assert diff < 1.5  # same pixels up to libx264's run-to-run noise (see data/synth.py)
    other = tmp_path / "seed1"
    generate(other, n_train=8, n_val=0, seed=1, workers=1)
    assert read(other, "train") != read(corpus, "train")[:8]
    # every val clip differs from every train clip with the same attributes
    train = read(corpus, "train")
    for v in read(corpus, "val"):
        fv = frames4(corpus, v).astype(int)
        for t in (t for t in train if t["attributes"] == v["attributes"]):
            assert np.abs(fv - frames4(corpus, t).astype(int)).mean() > 4, (v, t)


def run_synth(cwd: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    cmd = [sys.executable, "-m", "data.synth", *overrides]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_cli_writes_only_the_corpus(tmp_path):
    out = run_synth(tmp_path, "output=corpus", "n_train=5", "n_val=2", "seed=3", "workers=1")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "wrote 5 train + 2 val clips to corpus" in out.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]  # no outputs/ or .log from Hydra
    assert sorted(p.name for p in (tmp_path / "corpus").iterdir()) == ["train.jsonl", "val.jsonl", "videos"]
    assert len(list((tmp_path / "corpus" / "videos" / "val").glob("*.mp4"))) == 2
    assert [r["video"] for r in read(tmp_path / "corpus", "val")] == [
        "videos/val/000000.mp4",
        "videos/val/000001.mp4",
    ]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["image_size=8", "seconds=0.25"], "got image_size=8, frames=2"),  # 0.25 s × 8 fps: 2 frames
        (["size=32"], "size"),  # the old key name is refused at composition
    ],
)
def test_cli_usage_errors_are_one_line_and_write_nothing(tmp_path, overrides, message):
    out = run_synth(tmp_path, "output=corpus", "n_train=2", "n_val=1", "workers=1", *overrides)
    assert out.returncode == 2, (out.stdout, out.stderr[-2000:])
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("error: "), out.stderr[-2000:]
    assert message in out.stderr and "Traceback" not in out.stderr
    assert list(tmp_path.iterdir()) == []
