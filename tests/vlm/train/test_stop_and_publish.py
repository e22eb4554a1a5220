"""Training stops cleanly: SIGTERM/SIGINT end a real run after the step with a checkpoint, a one-line
message and 143/130, and the resumed run continues the same loss curve; `last` always names a complete
checkpoint, whichever step of publishing a new one is interrupted; a damaged checkpoint is named."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vlm.train.run import train

REPO = Path(__file__).resolve().parents[3]


def losses(out_dir: Path) -> dict[int, float]:
    with open(next((out_dir / "csv").glob("version_*/metrics.csv"))) as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


def base(synth_root: Path, out: Path, *extra: str) -> list[str]:
    return [f"data.root={synth_root}", f"output_dir={out}", "data.num_workers=0", "train.batch_size=4",
            "train=stage2_lora", "train.lora.r=4", "train.max_steps=8", "train.val_every_n_steps=1000",
            "train.checkpoint_every_n_steps=1000", "train.log_every_n_steps=1", "progress=false", *extra]  # fmt: skip


def cli(*args: str, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


@pytest.mark.slow  # ~90 s: three CLI runs (reference, stopped, resumed), all in their own processes
@pytest.mark.parametrize(("sig", "code", "name"), [(signal.SIGTERM, 143, "SIGTERM")])
def test_signal_stops_after_the_step_and_resume_continues_the_curve(synth_root, tmp_path, sig, code, name):
    ref = tmp_path / "ref"
    p = cli(*base(synth_root, ref), cwd=tmp_path)
    assert p.wait(timeout=600) == 0, p.communicate()[1][-3000:]
    want = losses(ref)
    part = tmp_path / "part"
    p = cli(*base(synth_root, part), cwd=tmp_path)
    deadline = time.monotonic() + 300
    while not (part / "csv").exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # the loggers' folder appears when fit starts
    time.sleep(1.0)
    p.send_signal(sig)
    _, err = p.communicate(timeout=300)
    assert p.returncode == code, err[-3000:]
    last = part / "checkpoints" / "last"
    step = int(last.resolve().name.split("_")[1])
    assert 1 <= step < 8, "the run should have been stopped mid-way"
    assert (
        f"stopped by {name} after step {step}; checkpoint {last}; resume with the same command plus train.resume={last}"
        in err
    )
    assert "Traceback" not in err
    p = cli(*base(synth_root, tmp_path / "resumed", f"train.resume={last}"), cwd=tmp_path)
    assert p.wait(timeout=600) == 0, p.communicate()[1][-3000:]
    got = losses(tmp_path / "resumed")
    assert sorted(got) == list(range(step, 8))
    for s in got:  # nothing lost, nothing repeated: the uninterrupted run's losses
        assert got[s] == pytest.approx(want[s], rel=1e-5, abs=1e-6), s


STAGES = ("write", "rename", "link", "swap")


@pytest.mark.parametrize("stage", STAGES)
def test_last_survives_an_interrupted_publish_and_resumes(compose, synth_root, tmp_path, monkeypatch, stage):
    """Checkpoint 2 is interrupted at `stage`; `last` still names a complete checkpoint and a run resumes."""
    import vlm.train.checkpoint as ck
    import vlm.util.files as files

    def breaking(real, hit):
        def f(*args, **kw):
            if hit(args):
                raise OSError(5, f"injected failure at {stage}")
            return real(*args, **kw)

        return f

    two = "step_000002"
    if stage == "write":
        monkeypatch.setattr(ck, "save_file", breaking(ck.save_file, lambda a: two in str(a[1])))
    elif stage == "rename":
        monkeypatch.setattr(ck, "publish_dir", breaking(ck.publish_dir, lambda a: two in str(a[1])))
    elif stage == "link":
        monkeypatch.setattr(files.os, "symlink", breaking(os.symlink, lambda a: two in str(a[0])))
    else:
        linked = {"two": False}
        real_symlink = os.symlink

        def note(src, dst, *a, **k):
            linked["two"] = two in str(src)
            return real_symlink(src, dst, *a, **k)

        monkeypatch.setattr(files.os, "symlink", note)
        monkeypatch.setattr(
            files.os, "replace", breaking(os.replace, lambda a: linked["two"] and str(a[1]).endswith("last"))
        )
    out = tmp_path / "run"
    cfg = compose("train", base(synth_root, out, "train.max_steps=3", "train.checkpoint_every_n_steps=1"))
    with pytest.raises(Exception, match=f"injected failure at {stage}"):
        train(cfg)
    monkeypatch.undo()
    last = out / "checkpoints" / "last"
    assert last.resolve().name == "step_000001" and {p.name for p in last.iterdir()} == {
        "state.json",
        "tensors.safetensors",
    }
    leftovers = [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    assert leftovers == []  # no half-written directory or temporary link is left behind
    res = train(
        compose("train", base(synth_root, tmp_path / "again", "train.max_steps=3", f"train.resume={last}"))
    )
    assert res["global_step"] == 3


def test_resuming_a_damaged_checkpoint_names_the_file(compose, synth_root, tmp_path):
    from vlm.util.errors import UsageError

    out = tmp_path / "run"
    train(compose("train", base(synth_root, out, "train.max_steps=1")))
    step = (out / "checkpoints" / "last").resolve()
    tensors = step / "tensors.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:100])
    with pytest.raises(UsageError, match=r"train.resume: .*last/tensors.safetensors: damaged"):
        train(
            compose(
                "train", base(synth_root, tmp_path / "r2", f"train.resume={out / 'checkpoints' / 'last'}")
            )
        )
