"""Folder captioning end to end: mixed good/broken folder, resume (changed file, retry, torn line),
kill -9 and SIGTERM mid-run then resume, two DDP processes vs one, SRT output, usage errors."""

from __future__ import annotations

import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vlm.infer.discover import discover
from vlm.infer.output import latest
from vlm.infer.srt import srt_dir
from vlm.util.errors import UsageError
from vlm.util.jsonl import read_jsonl

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "data"))
from data_fixtures import make_audio_only, make_video

REPO = Path(__file__).resolve().parents[3]
GEN = {"generation.max_new_tokens": 6, "progress": False}
N_GOOD = 8


@pytest.fixture(scope="module")
def export_dir(tiny_export) -> Path:
    """A tiny export (NF4 base + LoRA after three training steps): the model under test."""
    return tiny_export


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
    return {"root": d, "good": sorted(names), "bad": bad}


def run_inproc(export_dir: Path, folder: dict, output: Path, **kw) -> dict:
    from vlm.infer.run import caption_folder

    return caption_folder(
        folder["root"], output, export_dir, **{**GEN, "batch_size": 4, "num_workers": 0, **kw}
    )


@pytest.fixture(scope="module")
def reference(export_dir, folder, tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("cap_ref") / "captions.jsonl"
    return run_inproc(export_dir, folder, out, num_workers=2), out


def lines(path: Path) -> list[dict]:
    c = read_jsonl(path)
    assert not c.damaged and not c.torn, (c.damaged, c.torn)  # every line complete, valid JSON
    return c.objects


def by_video(path: Path, unique: bool = True) -> dict[str, dict]:
    recs = lines(path)
    if unique:
        videos = [r["video"] for r in recs]
        assert len(videos) == len(set(videos)), "a video appears twice"
    return {r["video"]: r for r in latest(recs)}


def cli(*args: str, cwd: Path, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "vlm.caption", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)  # fmt: skip


def wait_for_lines(p: subprocess.Popen, out: Path, n: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and p.poll() is None:
        if len(read_jsonl(out).records) >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"no {n} lines before the run ended: {p.communicate()[1][-2000:]}")


def test_discovery_is_recursive_case_insensitive_and_sorted(folder):
    videos, unreadable = discover(folder["root"])
    assert [v.rel for v in videos] == sorted(folder["good"] + folder["bad"]) and unreadable == []


def test_mixed_folder_captions_good_records_bad_exit_3(reference, folder, export_dir):
    summary, out = reference
    meta = json.loads((export_dir / "vlm.json").read_text())
    assert summary["exit_code"] == 3
    assert (summary["ok"], summary["failed"], summary["skipped"]) == (N_GOOD, len(folder["bad"]), 0)
    assert [r["video"] for r in lines(out)] == sorted(folder["good"] + folder["bad"])  # deterministic order
    recs = by_video(out)
    for v in folder["good"]:
        r = recs[v]
        assert r["error"] is None and r["caption"], r
        assert len(r["frames"]) == len(r["timestamps"]) == meta["frames"]["num_frames"]
        assert r["duration_s"] == pytest.approx(2.0) and r["decoder"] in ("decord", "pyav")
        assert r["model"] == meta["id"] and len(r["prompt_sha"]) == 12 and "warning" not in r
    reasons = {"zero": "empty file", "dir": "is a directory", "fifo": "not a regular file", "audio": "no video stream",
               "tiny": "below", "text": "not a readable video container", "half": "not a readable video container"}  # fmt: skip
    for v in folder["bad"]:
        r = recs[v]
        assert r["caption"] is None and r["frames"] is None
        assert str(folder["root"] / v) in r["error"] and "\n" not in r["error"]
        assert reasons[Path(v).stem] in r["error"], r["error"]
    assert not (out.parent / "captions.jsonl.lock").exists()  # the lock goes with the run


def test_rerun_skips_done_appends_changed_and_retries_failed(reference, folder, export_dir, tmp_path):
    _, ref_out = reference
    out = tmp_path / "c.jsonl"
    shutil.copy(ref_out, out)
    before = out.read_bytes()
    s = run_inproc(export_dir, folder, out)
    assert (s["ok"], s["failed"], s["skipped"], s["earlier_failed"], s["exit_code"]) == (0, 0, 15, 7, 3)
    assert out.read_bytes() == before  # nothing rewritten, nothing appended
    changed = folder["root"] / "sub" / "d.mov"  # a changed video (new mtime)
    st = changed.stat()
    os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    try:
        s = run_inproc(export_dir, folder, out)
        assert (s["ok"], s["failed"], s["skipped"]) == (1, 0, 14)
        assert out.read_bytes().startswith(before)  # append-only: every earlier byte is still there
        recs = lines(out)
        assert len(recs) == 16 and recs[-1]["video"] == "sub/d.mov"  # the new line supersedes the old one
        now = by_video(out, unique=False)
        assert now["sub/d.mov"]["mtime_ns"] == st.st_mtime_ns + 10**9
        assert now["sub/d.mov"]["caption"] == by_video(ref_out)["sub/d.mov"]["caption"]
        s = run_inproc(export_dir, folder, out, retry_failed=True)  # only the failed ones run again
        assert (s["ok"], s["failed"], s["skipped"]) == (0, 7, 8)
        assert sorted(r["video"] for r in lines(out)[-7:]) == folder["bad"]
    finally:  # the folder is shared with the other tests
        os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_returns_with_its_model_freed(export_dir, folder, tmp_path):
    """A process that captions folder after folder holds no model between calls: the Trainer keeps it in
    reference cycles, which the function collects before returning (automatic collection is off here,
    so nothing else can)."""
    from vlm.infer.run import caption_folder
    from vlm.model.vlm import VLM

    (tmp_path / "in").mkdir()
    shutil.copy(folder["root"] / "a.mp4", tmp_path / "in" / "a.mp4")
    alive = lambda: sum(isinstance(o, VLM) for o in gc.get_objects())  # noqa: E731
    gc.collect()  # earlier tests' garbage
    before = alive()
    gc.disable()
    try:
        s = caption_folder(
            tmp_path / "in", tmp_path / "o.jsonl", export_dir, batch_size=1, num_workers=0, **GEN
        )
        assert s["ok"] == 1 and alive() == before
    finally:
        gc.enable()


@pytest.mark.slow  # ~40 s: two CLI processes
def test_kill_9_mid_run_then_resume(reference, folder, export_dir, tmp_path):
    _, ref_out = reference
    out = tmp_path / "k.jsonl"
    args = [f"input={folder['root']}", f"output={out}", f"export={export_dir}", "batch_size=1",
            "num_workers=1", "generation.max_new_tokens=6", "trainer.accelerator=cpu"]  # fmt: skip
    p = cli(*args, "progress=false", cwd=tmp_path, start_new_session=True)
    wait_for_lines(p, out, 3)
    os.killpg(p.pid, signal.SIGKILL)  # the CLI, its DataLoader worker and their decode processes
    p.wait()
    done = lines(out)
    assert 3 <= len(done) < 15
    with open(out, "ab") as f:  # what a kill in the middle of a write leaves
        f.write('{"video": "z/h.mp4", "caption": "반'.encode())
    p = cli(*args, cwd=tmp_path)
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 3, stderr[-2000:]
    assert "video/s" in stderr  # the progress bar
    assert "a torn last line (a killed run) was moved to k.jsonl.torn-" in stderr
    torn = list(tmp_path.glob("k.jsonl.torn-*"))
    assert (
        len(torn) == 1 and torn[0].read_text() == '{"video": "z/h.mp4", "caption": "반'
    )  # kept, not deleted
    assert f"{len(done)} skipped (already in the output)" in stdout
    got, want = by_video(out), by_video(ref_out)
    assert sorted(got) == sorted(want)
    for v, r in want.items():
        assert (got[v]["caption"], got[v]["error"], got[v]["frames"]) == (
            r["caption"],
            r["error"],
            r["frames"],
        ), v


@pytest.mark.slow  # ~40 s: two CLI processes
@pytest.mark.parametrize(
    ("sig", "code", "name"), [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "SIGINT")]
)
def test_signal_stops_after_the_batch_then_resume_completes(
    reference, folder, export_dir, tmp_path, sig, code, name
):
    _, ref_out = reference
    out = tmp_path / "s.jsonl"
    args = [f"input={folder['root']}", f"output={out}", f"export={export_dir}", "batch_size=1", "num_workers=0",
            "generation.max_new_tokens=6", "trainer.accelerator=cpu", "progress=false"]  # fmt: skip
    p = cli(*args, cwd=tmp_path)
    wait_for_lines(p, out, 2)
    p.send_signal(sig)
    _, stderr = p.communicate(timeout=120)
    assert p.returncode == code, stderr[-2000:]
    assert f"stopped by {name} after" in stderr and "run the same command again to resume" in stderr
    assert "Traceback" not in stderr
    first = lines(out)  # complete lines only: the batch in flight was written whole
    assert 2 <= len(first) < 15 and not (tmp_path / "s.jsonl.lock").exists()
    p = cli(*args, cwd=tmp_path)
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 3, stderr[-2000:]
    got = by_video(out)  # nothing lost, nothing twice
    assert sorted(got) == sorted(by_video(ref_out)) and f"{len(first)} skipped" in stdout


@pytest.mark.slow  # ~30 s: two DDP processes, each loading the model
def test_two_ddp_processes_give_the_single_process_output(reference, folder, export_dir, tmp_path):
    _, ref_out = reference
    out = tmp_path / "ddp.jsonl"
    p = cli(f"input={folder['root']}", f"output={out}", f"export={export_dir}", "batch_size=4", "num_workers=0",
            "generation.max_new_tokens=6", "progress=false", "trainer.accelerator=cpu", "trainer.devices=2",
            "trainer.strategy=ddp", cwd=tmp_path)  # fmt: skip
    stdout, stderr = p.communicate(timeout=400)
    assert p.returncode == 3, stderr[-3000:]
    assert "on 2 process(es)" in stdout
    per_rank = json.loads(stdout.split("videos per process: ")[1].splitlines()[0])
    assert sorted(per_rank) == [7, 8]  # both processes worked, on disjoint halves
    assert not list(tmp_path.glob("ddp.jsonl.rank*.part"))  # part files folded into the output
    got, want = by_video(out), by_video(ref_out)
    assert sorted(got) == sorted(want)
    for v, r in want.items():
        assert {k: got[v][k] for k in r} == r, v


def parse_srt(text: str) -> list[tuple[float, float, str]]:
    """(start, end, text) per cue; strict enough to catch a malformed file."""

    def sec(t: str) -> float:
        hms, ms = t.split(",")
        h, m, s = (int(x) for x in hms.split(":"))
        return h * 3600 + m * 60 + s + int(ms) / 1000

    cues = []
    for i, block in enumerate(text.strip().split("\n\n"), 1):
        rows = block.split("\n")
        assert len(rows) >= 3 and rows[0] == str(i) and " --> " in rows[1], block
        a, b = rows[1].split(" --> ")
        cues.append((sec(a), sec(b), "\n".join(rows[2:])))
    return cues


def test_segments_write_monotonic_srt(export_dir, tmp_path):
    from vlm.infer.run import caption_folder

    root = tmp_path / "in"
    root.mkdir()
    make_video(root / "long.mp4", frames=13, fps=8)  # 1.625 s → windows 0-.5-1-1.5-1.625
    make_video(root / "short.mp4", frames=3, fps=8)  # 0.375 s → one window
    out = tmp_path / "seg.jsonl"
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
    from vlm.infer.run import caption_folder

    with pytest.raises(UsageError, match=r"not a kovicap export \(no vlm.json"):
        caption_folder(folder["root"], tmp_path / "o.jsonl", tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match=r"output=.*file/o.jsonl: not writable"):
        caption_folder(folder["root"], tmp_path / "file" / "o.jsonl", export_dir)
    other = tmp_path / "other.jsonl"
    line = json.loads(reference[1].read_text().splitlines()[0]) | {"model": "kovicap-000000000000"}
    other.write_text(json.dumps(line) + "\n")
    with pytest.raises(UsageError, match=r"holds lines with model='kovicap-000000000000'"):
        run_inproc(export_dir, folder, other)
    p = cli(
        f"input={tmp_path / 'nope'}", f"output={tmp_path / 'o.jsonl'}", f"export={export_dir}", cwd=tmp_path
    )
    _, stderr = p.communicate(timeout=120)
    assert p.returncode == 2
    assert stderr.strip().splitlines() == [f"error: input={tmp_path / 'nope'}: no such directory"]
