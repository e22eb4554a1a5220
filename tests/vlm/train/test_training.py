"""Two-stage Lightning training on the tiny model: loss falls, checkpoints, resume, feature cache."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from safetensors import safe_open

from vlm.train.run import train


def losses(out_dir: Path) -> dict[int, float]:
    """step -> train/loss from the CSV logger."""
    with open(next((out_dir / "csv").glob("version_*/metrics.csv"))) as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


def test_loss_falls_over_30_steps(tiny_cfg):
    # The tiny decoder is random, so it is LoRA (stage 2) that can pull the loss down quickly.
    cfg = tiny_cfg(
        "train=stage2_lora",
        "train.lora.r=8",
        "train.max_steps=30",
        "train.lr_lora=1e-2",
        "train.lr_projector=1e-3",
    )
    res = train(cfg)
    curve = losses(Path(cfg.output_dir))
    first = sum(curve[s] for s in range(0, 5)) / 5
    last = sum(curve[s] for s in range(25, 30)) / 5
    assert res["global_step"] == 30
    assert last < first - 0.5, (first, last)  # run-to-run noise here is ~0.05


def test_checkpoint_holds_only_trained_weights_and_stage2_starts_from_stage1(tiny_cfg, tmp_path):
    s1 = train(tiny_cfg("train=stage1_projector", "train.max_steps=4", f"output_dir={tmp_path / 's1'}"))
    ckpt = Path(s1["last_checkpoint"])
    assert ckpt.is_symlink() and ckpt.resolve().name == "step_000004"  # `last` links the final step
    assert sorted(p.name for p in ckpt.iterdir()) == ["state.json", "tensors.safetensors"]
    state = json.loads((ckpt / "state.json").read_text())
    names = list(state["state_dict"])
    assert names and all(n.startswith("vlm.projector.") for n in names)
    assert state["global_step"] == 4 and state["kovicap"]["config"]["train"]["stage"] == "stage1_projector"
    assert "optimizer_states" in state
    with safe_open(str(ckpt / "tensors.safetensors"), "pt") as f:
        proj_w = f.get_tensor("/state_dict/vlm.projector.fc1.weight")

    s2 = train(
        tiny_cfg(
            "train=stage2_lora",
            "train.lora.r=4",
            "train.max_steps=1",
            "train.lr_projector=0",  # the step leaves the projector as stage 1 left it
            f"train.init_from={ckpt}",
            f"output_dir={tmp_path / 's2'}",
        )
    )
    module = s2["module"]
    assert (module.vlm.projector.fc1.weight.detach() == proj_w).all()  # started from stage 1
    n_lora = sum(p.numel() for n, p in module.named_parameters() if p.requires_grad and ".lora_" in n)
    assert n_lora > 0 and s2["trainable_params"] == n_lora + sum(
        p.numel() for p in module.vlm.projector.parameters()
    )


def test_init_from_mismatched_checkpoint_names_both_shapes(tiny_cfg, tmp_path):
    s1 = train(tiny_cfg("train=stage1_projector", "train.max_steps=1", f"output_dir={tmp_path / 'a'}"))
    with pytest.raises(ValueError, match=r"has shape .* this model expects"):
        train(
            tiny_cfg(
                "projector.hidden_mult=2",
                "train.max_steps=1",
                f"train.init_from={s1['last_checkpoint']}",
                f"output_dir={tmp_path / 'b'}",
            )
        )


def test_resume_continues_with_the_same_loss_curve(tiny_cfg, tmp_path):
    common = (
        "train=stage2_lora",
        "train.lora.r=4",
        "train.max_steps=8",
        "train.checkpoint_every_n_steps=4",
    )
    full = tiny_cfg(*common, f"output_dir={tmp_path / 'full'}")
    train(full)  # writes step_000004 on the way
    ref = losses(Path(full.output_dir))
    ckpt = Path(full.output_dir) / "checkpoints" / "step_000004"
    assert ckpt.is_dir()
    # resumed from its step-4 checkpoint in a fresh process state, it continues the same curve
    res = train(tiny_cfg(*common, f"train.resume={ckpt}", f"output_dir={tmp_path / 'resumed'}"))
    got = losses(tmp_path / "resumed")
    assert res["global_step"] == 8
    assert sorted(got) == [4, 5, 6, 7]
    for step in got:
        assert got[step] == pytest.approx(ref[step], rel=1e-5, abs=1e-5), step


def test_feature_cache_trains_like_frames(tiny_cfg, tmp_path):
    base = ("train=stage1_projector", "train.max_steps=3")
    plain = train(tiny_cfg(*base, f"output_dir={tmp_path / 'plain'}"))
    cached = train(
        tiny_cfg(
            *base,
            "data.cache_features=true",
            f"data.cache_dir={tmp_path / 'cache'}",
            f"output_dir={tmp_path / 'cached'}",
        )
    )
    a, b = losses(tmp_path / "plain"), losses(tmp_path / "cached")
    for s in a:  # fp16 features vs fp32: same curve up to half-precision rounding
        assert b[s] == pytest.approx(a[s], rel=2e-3), s
    caches = list((tmp_path / "cache").iterdir())
    assert len(caches) == 1 and (caches[0] / "index.r0.json").exists()
    n = len(json.loads((caches[0] / "index.r0.json").read_text())["features"])
    assert n == 48 + 8  # every train and val clip encoded once
    assert cached["cache"]["encoded"] == 56 and cached["module"].vlm.vision is None  # the tower was released
    # a different sampling setting must not reuse those features
    train(
        tiny_cfg(
            *base,
            "data.num_frames=2",
            "data.cache_features=true",
            f"data.cache_dir={tmp_path / 'cache'}",
            f"output_dir={tmp_path / 'c2'}",
        )
    )
    assert len(list((tmp_path / "cache").iterdir())) == 2
    assert plain["global_step"] == cached["global_step"] == 3
