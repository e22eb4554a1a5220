"""`run_demo` end to end on a tiny corpus with a few steps: the report, the plots and the confusion
matrices it writes, the per-seed output folder, and warm-ups found again (not retrained) for other stage settings."""

from __future__ import annotations

import json
import shutil

import pytest

from data.korean import VOCAB

FAST = [
    "progress=false", "corpus.n_train=48", "corpus.n_val=8", "caption.batch_size=8",
    "warmup.decoder_steps=4", "warmup.vision_steps=3", "warmup.vision_batch=8",
    "stage1.steps=3", "stage1.batch_size=4", "stage2.steps=2", "stage2.batch_size=4", "stage2.r=4",
]  # fmt: skip
TRAIN = ["gpu=cpu", "data.cache_features=true", "data.num_workers=0", "projector.pool=2",
         "train.val_every_n_steps=1000", "train.checkpoint_every_n_steps=1000", "train.log_every_n_steps=1"]  # fmt: skip
FAST.append("train_overrides=[" + ",".join(f"'{o}'" for o in TRAIN) + "]")  # quoted: each holds an '='


@pytest.mark.slow
def test_run_demo_writes_report_plots_and_confusion(compose, synth_root, tmp_path, monkeypatch):
    from vlm.config import to_typed
    from vlm.demo.run import run_demo, warm_up

    out = tmp_path / "demo"
    shutil.copytree(synth_root, out / "seed3" / "synth", ignore=shutil.ignore_patterns("feature_cache"))
    report = run_demo(compose("demo", [f"output={out}", "seed=3", *FAST]))

    root = out / "seed3"  # a seed other than 0 writes below <output>/seed<N>, with its own corpus
    saved = json.loads((root / "report.json").read_text())
    assert saved["attribute_accuracy"] == report["attribute_accuracy"]
    for png in ("curves.png", "confusion.png"):
        assert (root / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["n_val"] == 8 and report["threads"] == 1
    assert report["precision"] in ("32-true", "bf16-mixed")
    for attr, m in report["confusion"].items():
        assert m["values"] == [*VOCAB[attr], "none"]
        assert sum(map(sum, m["counts"])) == 8  # every held-out clip once per attribute
        right = sum(m["counts"][i][i] for i in range(len(VOCAB[attr])))
        assert right / 8 == pytest.approx(report["per_attribute"][attr])
    assert set(report["probe"]) == {"random tower", "warmed tower"}
    assert list(report["accuracy_by_point"]) == [
        "probe (random tower)", "probe (warmed tower)", "stage 1 captions", "stage 2 captions"
    ]  # fmt: skip
    # the warmed tower travels with the export
    assert (root / "main" / "export" / "vision.safetensors").is_file()
    assert len(list((root / "main").glob("captions.jsonl"))) == 1

    # A rerun with other stage settings finds the corpus and both warm-ups (same settings, same keys).
    def boom(*a, **k):
        raise AssertionError("a warm-up ran again")

    monkeypatch.setattr("vlm.demo.warm_decoder.warm_decoder", boom)
    monkeypatch.setattr("vlm.demo.warm_vision.warm_vision", boom)
    monkeypatch.setattr("data.synth.generate", boom)
    warm = sorted(p.name for p in (root / "warm").iterdir())
    again = to_typed(
        compose("demo", [f"output={out}", "seed=3", *FAST, "stage2.steps=1", "stage1.lr_projector=1"])
    )
    _, common, stats = warm_up(again, "32-true", {})
    assert sorted(p.name for p in (root / "warm").iterdir()) == warm
    assert (
        stats["vision"]["probe"] == report["probe"]
        and stats["vision"]["token_probe"] == report["token_probe"]
    )
    assert any(o.startswith("vision.weights=") for o in common)
