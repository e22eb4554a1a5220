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
