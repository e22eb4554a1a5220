"""Batch captioning: mixed good/broken folder, resume (kill -9, torn line, changed file, retry), two
DDP processes vs one, SRT output, usage errors; discovery and output recovery units."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vlm.caption_io import discover, parse_srt, read_lines, recover, srt_dir

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
from data_fixtures import make_audio_only, make_video

REPO = Path(__file__).resolve().parents[2]
GEN = {"generation.max_new_tokens": 6, "progress": False}
N_GOOD = 8


@pytest.fixture(scope="module")
def export_dir(compose, synth_root, tmp_path_factory) -> Path:
    """A tiny export (NF4 base + LoRA after one training step): the model under test."""
    from vlm.export import export
    from vlm.training import train

    run = tmp_path_factory.mktemp("cap_train")
    cfg = compose(
        "train",
        [f"data.root={synth_root}", f"output_dir={run}", "data.num_workers=0", "train=stage2_lora",
         "train.batch_size=4", "train.max_steps=1", "train.lora_cfg.r=4", "train.val_every_n_steps=1000",
         "train.checkpoint_every_n_steps=1000", "trainer.enable_progress_bar=false"],
    )  # fmt: skip
    return export(train(cfg)["last_checkpoint"], run / "export")


@pytest.fixture(scope="module")
def folder(synth_root, tmp_path_factory) -> dict:
    """Good clips under mixed-case extensions in nested folders, every broken kind next to them."""
    d = tmp_path_factory.mktemp("cap_videos")
    src = sorted((synth_root / "videos" / "val").glob("*.mp4"))
    names = ["a.mp4", "B.MKV", "c.webm", "sub/d.mov", "sub/e.AVI", "sub/deeper/f.m4v", "g.Mp4", "z/h.mp4"]
    for s, n in zip(src, names, strict=True):
        (d / n).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(s, d / n)
    good = src[0].read_bytes()
    (d / "bad").mkdir()
    (d / "bad" / "zero.mp4").write_bytes(b"")
    (d / "bad" / "half.mov").write_bytes(good[: len(good) // 2])
    (d / "bad" / "text.webm").write_text("this is not a video\n")
    make_audio_only(d / "bad" / "audio.m4v")
    make_video(d / "bad" / "tiny.mp4", 1, 1, frames=4, pix_fmt="yuv444p")
    (d / "bad" / "dir.mkv").mkdir()
    os.mkfifo(d / "bad" / "fifo.avi")
    (d / "notes.txt").write_text("not a video")
    (d / "a.mp4.bak").write_bytes(good)
    bad = [
        "bad/audio.m4v",
        "bad/dir.mkv",
        "bad/fifo.avi",
        "bad/half.mov",
        "bad/text.webm",
        "bad/tiny.mp4",
        "bad/zero.mp4",
    ]
    assert len(names) == N_GOOD
    return {"root": d, "good": sorted(names), "bad": bad}


def run_inproc(export_dir: Path, folder: dict, output: Path, **kw) -> dict:
    from vlm.caption import caption_folder

    return caption_folder(
        folder["root"], output, export_dir, **{**GEN, "batch_size": 4, "num_workers": 0, **kw}
    )


@pytest.fixture(scope="module")
def reference(export_dir, folder, tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("cap_ref") / "captions.jsonl"
    return run_inproc(export_dir, folder, out, num_workers=2), out


def by_video(path: Path) -> dict[str, dict]:
    lines = path.read_text().splitlines()
    recs = [json.loads(x) for x in lines]  # every line is complete, valid JSON
    videos = [r["video"] for r in recs]
    assert len(videos) == len(set(videos)), "a video appears twice"
    return {r["video"]: r for r in recs}


def cli(*args: str, cwd: Path, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "vlm.caption", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)  # fmt: skip


def test_discovery_is_recursive_case_insensitive_and_sorted(folder):
    rels = [v.rel for v in discover(folder["root"])]
    assert rels == sorted(folder["good"] + folder["bad"])


def test_mixed_folder_captions_good_records_bad_exit_3(reference, folder, export_dir):
    summary, out = reference
    meta = json.loads((export_dir / "vlm.json").read_text())
    assert summary["exit_code"] == 3
    assert (summary["ok"], summary["failed"], summary["skipped"]) == (N_GOOD, len(folder["bad"]), 0)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["video"] for r in lines] == sorted(folder["good"] + folder["bad"])  # deterministic order
    recs = {r["video"]: r for r in lines}
    for v in folder["good"]:
        r = recs[v]
        assert r["error"] is None and r["caption"], r
        assert len(r["frames"]) == len(r["timestamps"]) == meta["frames"]["num_frames"]
        assert r["duration_s"] == pytest.approx(2.0) and r["decoder"] in ("decord", "pyav")
        assert r["model"] == meta["id"] and len(r["prompt_sha"]) == 12
    reasons = {"zero": "empty file", "dir": "is a directory", "fifo": "not a regular file", "audio": "no video stream",
               "tiny": "below", "text": "not a readable video container", "half": "not a readable video container"}  # fmt: skip
    for v in folder["bad"]:
        r = recs[v]
        assert r["caption"] is None and r["frames"] is None
        assert str(folder["root"] / v) in r["error"] and "\n" not in r["error"]
        assert reasons[Path(v).stem] in r["error"], r["error"]


def test_rerun_skips_done_redoes_changed_drops_torn_line_and_retries_failed(
    reference, folder, export_dir, tmp_path
):
    _, ref_out = reference
    out = tmp_path / "c.jsonl"
    shutil.copy(ref_out, out)
    before = out.read_bytes()
    s = run_inproc(export_dir, folder, out)
    assert (s["ok"], s["failed"], s["skipped"], s["earlier_failed"], s["exit_code"]) == (0, 0, 15, 7, 3)
    assert out.read_bytes() == before  # nothing rewritten, nothing appended
    # a changed video (new mtime) and a line torn by a kill mid-write
    changed = folder["root"] / "sub" / "d.mov"
    st = changed.stat()
    os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with open(out, "a") as f:
        f.write('{"video": "a.mp4", "capt')
    try:
        s = run_inproc(export_dir, folder, out)
        assert (s["ok"], s["failed"], s["skipped"]) == (1, 0, 14)
        recs = by_video(out)
        assert len(recs) == 15 and recs["sub/d.mov"]["mtime_ns"] == st.st_mtime_ns + 10**9
        assert list(recs)[-1] == "sub/d.mov"  # the old line went, the new one was appended
        assert recs["sub/d.mov"]["caption"] == by_video(ref_out)["sub/d.mov"]["caption"]
        # retry_failed: only the failed ones run again, and replace their lines
        s = run_inproc(export_dir, folder, out, retry_failed=True)
        assert (s["ok"], s["failed"], s["skipped"]) == (0, 7, 8)
        recs = by_video(out)
        assert len(recs) == 15 and sorted(list(recs)[-7:]) == folder["bad"]
    finally:  # the folder is shared with the other tests
        os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.slow  # ~30 s: two CLI processes
def test_kill_9_mid_run_then_resume(reference, folder, export_dir, tmp_path):
    _, ref_out = reference
    out = tmp_path / "k.jsonl"
    args = [f"input={folder['root']}", f"output={out}", f"checkpoint={export_dir}", "batch_size=1",
            "num_workers=1", "generation.max_new_tokens=6", "trainer.accelerator=cpu"]  # fmt: skip
    p = cli(*args, "progress=false", cwd=tmp_path, start_new_session=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and p.poll() is None:
        if out.exists() and len(read_lines(out)[0]) >= 3:
            break
        time.sleep(0.05)
    assert p.poll() is None, f"finished before it could be killed: {p.communicate()[1][-2000:]}"
    os.killpg(p.pid, signal.SIGKILL)  # the CLI, its DataLoader worker and their decode processes
    p.wait()
    done, valid, _ = read_lines(out)
    assert 3 <= len(done) < 15
    assert all(json.loads(x) for x in out.read_bytes()[:valid].decode().splitlines())
    with open(out, "ab") as f:  # what a kill in the middle of a write leaves
        f.write('{"video": "z/h.mp4", "caption": "반'.encode())
    p = cli(*args, cwd=tmp_path)
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 3, stderr[-2000:]
    assert "video/s" in stderr  # the progress bar
    assert "skipped (already in the output)" in stdout and f"{len(done)} skipped" in stdout
    got, want = by_video(out), by_video(ref_out)
    assert sorted(got) == sorted(want)
    for v, r in want.items():
        assert (got[v]["caption"], got[v]["error"], got[v]["frames"]) == (
            r["caption"],
            r["error"],
            r["frames"],
        ), v


@pytest.mark.slow  # ~30 s: two DDP processes, each loading the model
def test_two_ddp_processes_give_the_single_process_output(reference, folder, export_dir, tmp_path):
    _, ref_out = reference
    out = tmp_path / "ddp.jsonl"
    p = cli(f"input={folder['root']}", f"output={out}", f"checkpoint={export_dir}", "batch_size=4", "num_workers=0",
            "generation.max_new_tokens=6", "progress=false", "trainer.accelerator=cpu", "trainer.devices=2",
            "trainer.strategy=ddp", cwd=tmp_path)  # fmt: skip
    stdout, stderr = p.communicate(timeout=400)
    assert p.returncode == 3, stderr[-3000:]
    assert "on 2 process(es)" in stdout
    per_rank = json.loads(stdout.split("videos per process: ")[1].splitlines()[0])
    assert sorted(per_rank) == [7, 8]  # both processes worked, on disjoint halves
    assert not list(tmp_path.glob("ddp.jsonl.rank*.part"))  # shards folded into the output
    got, want = by_video(out), by_video(ref_out)
    assert sorted(got) == sorted(want)
    for v, r in want.items():
        assert {k: got[v][k] for k in r} == r, v


def test_segments_write_monotonic_srt(export_dir, tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    make_video(root / "long.mp4", frames=13, fps=8)  # 1.625 s → windows 0-.5-1-1.5-1.625
    make_video(root / "short.mp4", frames=3, fps=8)  # 0.375 s → one window
    out = tmp_path / "seg.jsonl"
    from vlm.caption import caption_folder

    s = caption_folder(root, out, export_dir, segment_seconds=0.5, batch_size=2, num_workers=0, **GEN)
    assert (s["ok"], s["failed"], s["exit_code"]) == (2, 0, 0)  # all captioned: exit 0
    (root / "broken.mp4").write_text("x")
    s = caption_folder(root, out, export_dir, segment_seconds=0.5, batch_size=2, num_workers=0, **GEN)
    assert (s["ok"], s["failed"], s["skipped"], s["exit_code"]) == (0, 1, 2, 3)
    recs = by_video(out)
    for name, n_cues, end in (("long.mp4", 4, 1.625), ("short.mp4", 1, 0.375)):
        cues = parse_srt((srt_dir(out) / name).with_suffix(".srt").read_text())
        assert len(cues) == n_cues == len(recs[name]["segments"])
        assert cues[0][0] == 0.0 and cues[-1][1] == pytest.approx(end)
        for (a, b, _), (c, _, _) in zip(cues, [*cues[1:], (end, end, "")], strict=True):
            assert a < b <= c  # monotonic, non-overlapping
        assert [c[2] for c in cues] == [" ".join(seg["caption"].split()) for seg in recs[name]["segments"]]
        assert all(a <= t < b + 1e-6 for seg in recs[name]["segments"] for a, b in [(seg["start"], seg["end"])]
                   for t in seg["timestamps"])  # fmt: skip
    assert not (srt_dir(out) / "broken.srt").exists()


def test_usage_errors(export_dir, folder, tmp_path, reference):
    from vlm.caption import caption_folder
    from vlm.caption_io import CaptionUsageError

    with pytest.raises(CaptionUsageError, match=r"checkpoint=.*: not an export directory"):
        caption_folder(folder["root"], tmp_path / "o.jsonl", tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(CaptionUsageError, match=r"output=.*file/o.jsonl: not writable"):
        caption_folder(folder["root"], tmp_path / "file" / "o.jsonl", export_dir)
    other = tmp_path / "other.jsonl"
    line = json.loads(reference[1].read_text().splitlines()[0]) | {"model": "kovicap-000000000000"}
    other.write_text(json.dumps(line) + "\n")
    with pytest.raises(CaptionUsageError, match=r"holds lines with model='kovicap-000000000000'"):
        run_inproc(export_dir, folder, other)
    p = cli(
        f"input={tmp_path / 'nope'}",
        f"output={tmp_path / 'o.jsonl'}",
        f"checkpoint={export_dir}",
        cwd=tmp_path,
    )
    _, stderr = p.communicate(timeout=120)
    assert p.returncode == 2
    assert stderr.strip().splitlines()[-1] == f"error: input={tmp_path / 'nope'}: no such directory"


def test_recover_folds_shards_drops_torn_tail_keeps_latest(tmp_path):
    out = tmp_path / "o.jsonl"
    out.write_text('{"video": "a", "caption": "1"}\n{"video": "b", "caption": "2"}\n{"video": "c", "cap')
    (tmp_path / "o.jsonl.rank1.part").write_text(
        '{"video": "a", "caption": "3"}\n{"video": "d", "caption": "4"}\n'
    )
    recs = recover(out)
    assert [(r["video"], r["caption"]) for r in recs] == [("b", "2"), ("a", "3"), ("d", "4")]
    assert read_lines(out) == (recs, len(out.read_bytes()), False)
    assert not list(tmp_path.glob("*.part"))
    assert recover(out, redo={"a"}) == [recs[0], recs[2]] and '"video": "a"' not in out.read_text()
