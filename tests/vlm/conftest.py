"""Shared tiny fixtures for the VLM tests: a small synthetic corpus and a tiny-config composer."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    from data.synth import generate

    root = tmp_path_factory.mktemp("synth")
    generate(str(root), n_train=48, n_val=8, seed=0)
    return root


@pytest.fixture
def tiny_cfg(compose, synth_root, tmp_path):
    """Composed train config on the cpu tier with tiny, fast settings; extra overrides appended."""

    def _cfg(*overrides: str):
        return compose(
            "train",
            [
                f"data.root={synth_root}",
                f"output_dir={tmp_path / 'run'}",
                "data.num_workers=0",
                "train.batch_size=4",
                "train.val_caption_subset=0",
                "train.val_every_n_steps=1000",
                "train.checkpoint_every_n_steps=1000",
                "train.log_every_n_steps=1",
                "progress=false",
                *overrides,
            ],
        )

    return _cfg


@pytest.fixture(scope="session")
def stage2_checkpoint(compose, synth_root, tmp_path_factory):
    """A tiny stage-2 checkpoint (NF4 base + LoRA r=4, 3 steps at a high rate so the adapter matters)."""
    from pathlib import Path

    from vlm.train.run import train

    out = tmp_path_factory.mktemp("stage2_run")
    cfg = compose(
        "train",
        [f"data.root={synth_root}", f"output_dir={out}", "data.num_workers=0", "train=stage2_lora",
         "train.batch_size=4", "train.max_steps=3", "train.lr_lora=1e-2", "train.lora.r=4",
         "train.val_every_n_steps=1000", "train.checkpoint_every_n_steps=1000", "progress=false"],
    )  # fmt: skip
    return Path(train(cfg)["last_checkpoint"])


@pytest.fixture(scope="session")
def tiny_export(stage2_checkpoint, tmp_path_factory):
    """That checkpoint exported (no merge): the model the captioning and bad-input tests load."""
    from vlm.export import export

    return export(stage2_checkpoint, tmp_path_factory.mktemp("tiny_export") / "export")
