"""Two-process DDP training on CPU (gloo) is one process with the doubled batch: the same loss curve in
stage 1 and stage 2, the feature cache encoded once across ranks, CIDEr-D computed once over every rank's
captions, one copy of each checkpoint, and an exact resume."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vlm.train.run import train

REPO = Path(__file__).resolve().parents[3]


def metrics(out: Path, key: str) -> dict[int, float]:
    with open(next((out / "csv").glob("version_*/metrics.csv"))) as f:
        return {int(r["step"]): float(r[key]) for r in csv.DictReader(f) if r.get(key)}


def common(root: Path, out: Path, cache: Path, *extra: str) -> list[str]:
    return [f"data.root={root}", f"output_dir={out}", "data.num_workers=0", "data.cache_features=true",
            f"data.cache_dir={cache}", "train.max_steps=3", "train.val_every_n_steps=3", "train.val_caption_subset=8",
            "train.val_max_new_tokens=4", "train.checkpoint_every_n_steps=1000", "train.log_every_n_steps=1",
            "progress=false", *extra]  # fmt: skip


def ddp(*args: str, cwd: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        str(REPO / "train.py"),
        *args,
        "trainer.devices=2",
        "trainer.strategy=ddp",
        "train.batch_size=2",
    ]
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]


def same_curve(got: dict[int, float], want: dict[int, float]) -> None:
    assert sorted(got) == sorted(want)
    for s in want:  # only the order of float sums differs (gradient all-reduce, token counts)
        assert got[s] == pytest.approx(want[s], rel=2e-6), s


@pytest.mark.slow  # ~3 min: three 2-process runs and two single-process ones
def test_two_processes_train_like_one_with_the_doubled_batch(compose, synth_root, tmp_path):
    # stage 1: single process, batch 4, vs 2 ranks x batch 2; each with a fresh feature cache
    one = tmp_path / "one_s1"
    train(compose("train", common(synth_root, one, tmp_path / "cache1", "train.batch_size=4")))
    two = tmp_path / "two_s1"
    ddp(*common(synth_root, two, tmp_path / "cache2"), cwd=tmp_path)
    same_curve(metrics(two, "train/loss"), metrics(one, "train/loss"))
    assert metrics(two, "val/CIDEr-D") == pytest.approx(
        metrics(one, "val/CIDEr-D"), rel=1e-9
    )  # one CIDEr over all
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["last", "step_000003"]  # written once
    (cache,) = (tmp_path / "cache2").iterdir()
    parts = [json.loads(p.read_text())["features"] for p in sorted(cache.glob("index.r*.json"))]
    assert len(parts) == 2 and all(len(p) in (28, 27, 29) for p in parts)  # the 56 clips split between ranks
    assert not set(parts[0]) & set(parts[1]) and len(parts[0]) + len(parts[1]) == 48 + 8  # each encoded once

    # stage 2 from each stage-1 checkpoint (LoRA dropout off: ranks draw their own masks)
    s2 = ("train=stage2_lora", "train.lora.r=4", "train.lora.dropout=0", "train.checkpoint_every_n_steps=2")
    one2 = tmp_path / "one_s2"
    train(compose("train", common(synth_root, one2, tmp_path / "cache1", *s2, "train.batch_size=4",
                                  f"train.init_from={one / 'checkpoints' / 'last'}")))  # fmt: skip
    two2 = tmp_path / "two_s2"
    ddp(
        *common(
            synth_root, two2, tmp_path / "cache2", *s2, f"train.init_from={two / 'checkpoints' / 'last'}"
        ),
        cwd=tmp_path,
    )
    same_curve(metrics(two2, "train/loss"), metrics(one2, "train/loss"))
    # and a DDP run resumed from step 2 continues that curve
    back = tmp_path / "two_s2_resumed"
    ddp(
        *common(
            synth_root, back, tmp_path / "cache2", *s2, f"train.resume={two2 / 'checkpoints' / 'step_000002'}"
        ),
        cwd=tmp_path,
    )
    got, want = metrics(back, "train/loss"), metrics(two2, "train/loss")
    assert sorted(got) == [2] and got[2] == pytest.approx(want[2], rel=2e-6)
