"""Bad input, table-driven, through every CLI: each case asserts the exit code (2 usage, 1 runtime), one
`error:` line naming the thing (no traceback), that no model was loaded before a usage error, and that no
byte the run did not write changed. The CLIs run in this process (`run_cli`), as `python -m ...` would."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

TRAIN = "train.py"
CAPTION, EXPORT, PLAN = "vlm.caption", "vlm.export", "vlm.plan"
KMMLU, EVAL_CAPTION, CHECK, SYNTH = "eval.kmmlu", "eval.caption", "data.check", "data.synth"


def digest(path: Path) -> str:
    """A fingerprint of a file or a whole folder (names, bytes, link targets)."""
    h = hashlib.sha256()
    items = [path] if not path.is_dir() or path.is_symlink() else sorted(path.rglob("*"))
    for p in items:
        h.update(str(p.relative_to(path.parent)).encode())
        if p.is_symlink():
            h.update(os.readlink(p).encode())
        elif p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def w(synth_root, stage2_checkpoint, tiny_export, tmp_path_factory) -> dict[str, Path]:
    """Every broken thing the cases point at, made once."""
    d = tmp_path_factory.mktemp("bad")
    w = {"root": synth_root, "ckpt": stage2_checkpoint.resolve(), "export": tiny_export, "d": d}
    # annotations with a broken line 3 (of 48)
    lines = (synth_root / "train.jsonl").read_text().splitlines()
    lines[2] = '{"video": "videos/train/x.mp4", "caption": '
    (d / "train_bad.jsonl").write_text("\n".join(lines) + "\n")
    w["bad_ann"] = d / "train_bad.jsonl"
    # checkpoints: truncated tensors, damaged state.json, a folder that is not a checkpoint
    for name, damage in (("ckpt_trunc", "tensors"), ("ckpt_state", "state")):
        c = d / name
        shutil.copytree(w["ckpt"], c)
        f = c / ("tensors.safetensors" if damage == "tensors" else "state.json")
        f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 3])
        w[name] = c
    (d / "not_ckpt").mkdir()
    w["not_ckpt"] = d / "not_ckpt"
    # exports whose vlm.json points outside, whose adapter is only a pickle, whose weights are truncated
    secret = d / "secret.safetensors"
    shutil.copy(tiny_export / "projector.safetensors", secret)
    for name, change in (
        ("exp_abs", lambda e, m: m["projector"].update(weights="/etc/passwd")),
        ("exp_rel", lambda e, m: m["projector"].update(weights="../../../etc/shadow")),
        ("exp_link", lambda e, m: ((e / "projector.safetensors").unlink(), (e / "projector.safetensors").symlink_to(secret))),
        ("exp_adapter_out", lambda e, m: m["adapter"].update(path="../exp_abs/adapter")),
        ("exp_pickle", lambda e, m: ((e / "adapter" / "adapter_model.safetensors").rename(e / "adapter" / "adapter_model.bin"),)),
        ("exp_trunc", lambda e, m: (e / "projector.safetensors").write_bytes((e / "projector.safetensors").read_bytes()[:-100])),
    ):  # fmt: skip
        e = d / name
        shutil.copytree(tiny_export, e, symlinks=True)
        meta = json.loads((e / "vlm.json").read_text())
        change(e, meta)
        (e / "vlm.json").write_text(json.dumps(meta))
        w[name] = e
    (d / "notes.jsonl").write_text("my shopping list\n- 우유\n")
    w["notes"] = d / "notes.jsonl"
    (d / "preds.jsonl").write_text('{"video": "a.mp4", "caption": "x"}\n{broken\n')
    w["preds_bad"] = d / "preds.jsonl"
    (d / "kmmlu_empty").mkdir()
    w["kmmlu_empty"] = d / "kmmlu_empty"
    (d / "out_dir").mkdir()
    (d / "out_dir" / "mine.txt").write_text("keep me")
    w["nonempty_out"] = d / "out_dir"
    return w


def tr(w, *extra: str) -> list[str]:
    """A small, valid training command on the synthetic corpus, plus `extra` overrides."""
    return [f"data.root={w['root']}", f"output_dir={w['d'] / 'run'}", "data.num_workers=0", "progress=false",
            "train.max_steps=1", "train.batch_size=2", *extra]  # fmt: skip


def cap(w, *extra: str) -> list[str]:
    return [f"input={w['root'] / 'videos' / 'val'}", f"output={w['d'] / 'c.jsonl'}", f"export={w['export']}",
            "progress=false", "num_workers=0", *extra]  # fmt: skip


Case = tuple[str, str, Callable[[dict], list[str]], int, str, tuple[str, ...]]
CASES: list[Case] = [
    # -- bad values and types (usage: exit 2, before any model loads) --------------------------------
    ("train-type", TRAIN, lambda w: tr(w, "train.batch_size=abc"), 2, "train.batch_size=abc", ()),
    ("train-devices-0", TRAIN, lambda w: tr(w, "trainer.devices=0"), 2, "trainer.devices=0: must be >= 1", ()),
    ("train-frames-0", TRAIN, lambda w: tr(w, "data.num_frames=0"), 2, "data.num_frames=0: must be >= 1", ()),
    ("train-dropout", TRAIN, lambda w: tr(w, "train=stage2_lora", "train.lora.dropout=1.5"), 2, "train.lora.dropout=1.5", ()),
    ("train-unknown-key", TRAIN, lambda w: tr(w, "train.lr=1"), 2, "Could not override 'train.lr'", ()),
    ("train-frames-vs-projector", TRAIN, lambda w: tr(w, "data.num_frames=80"), 2, "projector.max_frames=64", ()),
    ("train-fsdp", TRAIN, lambda w: tr(w, "trainer.strategy=fsdp"), 2, "trainer.strategy=fsdp: not supported", ()),
    ("caption-fsdp", CAPTION, lambda w: cap(w, "trainer.strategy=fsdp"), 2, "trainer.strategy=fsdp: not supported", ()),
    ("caption-max-new-tokens-0", CAPTION, lambda w: cap(w, "generation.max_new_tokens=0"), 2, "generation.max_new_tokens=0", ()),
    ("caption-frames-0", CAPTION, lambda w: cap(w, "frames.num_frames=0"), 2, "frames: num_frames", ()),
    ("caption-batch-0", CAPTION, lambda w: cap(w, "batch_size=0"), 2, "batch_size=0: must be >= 1", ()),
    ("caption-required", CAPTION, lambda w: [], 2, "export=, input=, output= required", ()),
    ("plan-tier", PLAN, lambda w: ["gpu=v100"], 2, "Could not find 'gpu/v100'", ()),
    ("export-dtype", EXPORT, lambda w: [f"checkpoint={w['ckpt']}", f"output={w['d'] / 'e1'}", "merge_dtype=int8"], 2, "merge_dtype='int8'", ()),
    ("kmmlu-mode", KMMLU, lambda w: ["mode=fast", f"data_dir={w['kmmlu_empty']}"], 2, "mode=fast", ()),
    ("eval-tokenize", EVAL_CAPTION, lambda w: [f"predictions={w['preds_bad']}", f"references={w['root'] / 'val.jsonl'}", "tokenize=words"], 2, "tokenize=words", ()),
    ("synth-size", SYNTH, lambda w: [f"output={w['d'] / 'synth'}", "image_size=4"], 2, "image_size", ()),
    # -- missing or damaged files ----------------------------------------------------------------------
    ("train-root-missing", TRAIN, lambda w: tr(w, f"data.root={w['d'] / 'nope'}"), 2, "data.root=", ()),
    ("train-bad-annotations", TRAIN, lambda w: tr(w, f"data.train={w['bad_ann']}"), 2, "line 3", ("bad_ann",)),
    ("train-resume-missing", TRAIN, lambda w: tr(w, f"train.resume={w['d'] / 'gone'}"), 2, "no such checkpoint directory", ()),
    ("train-resume-truncated", TRAIN, lambda w: tr(w, f"train.resume={w['ckpt_trunc']}"), 2, "tensors.safetensors: damaged", ("ckpt_trunc",)),
    ("train-resume-bad-state", TRAIN, lambda w: tr(w, f"train.resume={w['ckpt_state']}"), 2, "state.json: damaged", ("ckpt_state",)),
    ("train-init-not-ckpt", TRAIN, lambda w: tr(w, f"train.init_from={w['not_ckpt']}"), 2, "not a kovicap checkpoint", ()),
    ("train-model-dir-missing", TRAIN, lambda w: tr(w, "model.name_or_path=/nonexistent/model"), 2, "model.name_or_path=/nonexistent/model", ()),
    ("caption-input-missing", CAPTION, lambda w: cap(w, f"input={w['d'] / 'nope'}"), 2, "no such directory", ()),
    ("caption-not-an-export", CAPTION, lambda w: cap(w, f"export={w['d']}"), 2, "not a kovicap export", ()),
    ("caption-foreign-output", CAPTION, lambda w: cap(w, f"output={w['notes']}"), 2, "not captions of vlm.caption", ("notes",)),
    ("export-ckpt-missing", EXPORT, lambda w: [f"checkpoint={w['d'] / 'gone'}", f"output={w['d'] / 'e2'}"], 2, "no such checkpoint directory", ()),
    ("export-ckpt-truncated", EXPORT, lambda w: [f"checkpoint={w['ckpt_trunc']}", f"output={w['d'] / 'e3'}"], 2, "tensors.safetensors: damaged", ("ckpt_trunc",)),
    ("export-nonempty-output", EXPORT, lambda w: [f"checkpoint={w['ckpt']}", f"output={w['nonempty_out']}"], 2, "directory is not empty", ("nonempty_out",)),
    ("kmmlu-data-missing", KMMLU, lambda w: [f"data_dir={w['d'] / 'nope'}"], 2, "data_dir=", ()),
    ("kmmlu-data-empty", KMMLU, lambda w: [f"data_dir={w['kmmlu_empty']}"], 2, "-test.csv", ()),
    ("eval-damaged-predictions", EVAL_CAPTION, lambda w: [f"predictions={w['preds_bad']}", f"references={w['root'] / 'val.jsonl'}"], 2, "preds.jsonl:2", ("preds_bad",)),
    ("check-missing", CHECK, lambda w: [f"annotations={w['d'] / 'nope.jsonl'}"], 2, "nope.jsonl", ()),
    # -- the export directory is a boundary ------------------------------------------------------------
    ("export-abs-path", CAPTION, lambda w: cap(w, f"export={w['exp_abs']}"), 2, "projector.weights='/etc/passwd' must be a path relative to the export", ("exp_abs",)),
    ("export-dotdot", CAPTION, lambda w: cap(w, f"export={w['exp_rel']}"), 2, "projector.weights='../../../etc/shadow' points outside the export", ("exp_rel",)),
    ("export-symlink-out", CAPTION, lambda w: cap(w, f"export={w['exp_link']}"), 2, "projector.weights='projector.safetensors' points outside the export", ("exp_link",)),
    ("export-adapter-elsewhere", CAPTION, lambda w: cap(w, f"export={w['exp_adapter_out']}"), 2, "adapter.path='../exp_abs/adapter' points outside", ("exp_adapter_out",)),
    ("export-pickle-adapter", CAPTION, lambda w: cap(w, f"export={w['exp_pickle']}"), 2, "adapter_model.safetensors: adapter weights is missing", ("exp_pickle",)),
    ("export-truncated", CAPTION, lambda w: cap(w, f"export={w['exp_trunc']}"), 2, "projector.safetensors: truncated", ("exp_trunc",)),
    # -- resources: runtime failures, exit 1 -----------------------------------------------------------
    ("train-no-gpu", TRAIN, lambda w: tr(w, "trainer.accelerator=gpu"), 1, "trainer.accelerator=gpu: no CUDA device", ()),
    ("caption-no-gpu", CAPTION, lambda w: cap(w, "trainer.accelerator=gpu"), 1, "trainer.accelerator=gpu: no CUDA device", ()),
]  # fmt: skip


@pytest.fixture
def no_model_load(monkeypatch):
    """Usage errors must be found before a weight is loaded: loading fails the test."""
    import vlm.model.build
    import vlm.model.decoder

    def forbidden(*a, **k):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(vlm.model.decoder, "load_decoder", forbidden)
    monkeypatch.setattr(vlm.model.build, "load_decoder", forbidden)


@pytest.mark.parametrize(
    ("name", "module", "args", "code", "message", "keep"), CASES, ids=[c[0] for c in CASES]
)
def test_bad_input(w, run_cli, no_model_load, name, module, args, code, message, keep):
    before = {k: digest(w[k]) for k in keep}
    got, _, err = run_cli(module, *args(w))
    errors = [x for x in err.splitlines() if x.startswith("error: ")]
    assert got == code, (name, err[-3000:])
    assert "Traceback" not in err and len(errors) == 1, err[-3000:]
    assert message in errors[0], (message, errors[0])
    assert {k: digest(w[k]) for k in keep} == before  # nothing it did not write was changed


def test_full_disk_while_captioning_is_a_runtime_failure_and_keeps_what_was_written(
    w, run_cli, monkeypatch, tmp_path
):
    import vlm.infer.predict

    out = tmp_path / "c.jsonl"
    calls = {"n": 0}
    real = vlm.infer.predict.append_jsonl

    def full_after_one(f, records):
        calls["n"] += 1
        if calls["n"] > 1:
            raise OSError(28, "No space left on device")
        real(f, records)

    monkeypatch.setattr(vlm.infer.predict, "append_jsonl", full_after_one)
    code, _, err = run_cli(CAPTION, *cap(w, f"output={out}", "batch_size=2", "generation.max_new_tokens=2"))
    assert code == 1, err[-2000:]
    assert f"error: output={out}: cannot write (No space left on device); rerun to resume" in err
    assert len(out.read_text().splitlines()) == 2 and not (tmp_path / "c.jsonl.lock").exists()


def test_full_disk_while_checkpointing_keeps_last(w, run_cli, monkeypatch, tmp_path):
    import vlm.train.checkpoint

    real, calls = vlm.train.checkpoint.save_file, {"n": 0}

    def full_on_second(*a, **k):
        calls["n"] += 1
        if calls["n"] > 1:
            raise OSError(28, "No space left on device")
        real(*a, **k)

    monkeypatch.setattr(vlm.train.checkpoint, "save_file", full_on_second)
    out = tmp_path / "run"
    code, _, err = run_cli(
        TRAIN, *tr(w, f"output_dir={out}", "train.max_steps=2", "train.checkpoint_every_n_steps=1")
    )
    assert code == 1, err[-2000:]
    assert "cannot write (No space left on device); `last` still names the previous one" in err
    last = out / "checkpoints" / "last"
    assert last.resolve().name == "step_000001" and (last / "state.json").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "last",
        "step_000001",
    ]  # no half-written dir


def test_banners_are_silenced(w, run_cli, tmp_path):
    code, out, err = run_cli(TRAIN, *tr(w, f"output_dir={tmp_path / 'r'}"))
    assert code == 0, err[-2000:]
    for banner in ("GPU available", "TPU available", "Tip:", "Loading weights", "FutureWarning"):
        assert banner not in err + out, banner
