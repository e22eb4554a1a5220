"""Test-wide setup: offline hub, Triton's CPU interpreter, a per-session cache for tiny models."""

from __future__ import annotations

import os

# Set before anything imports transformers or triton.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


@pytest.fixture(scope="session")
def compose():
    """hydra.compose over the real conf/ tree: compose("train", ["gpu=l4", ...])."""
    from hydra import compose as hcompose
    from hydra import initialize_config_dir

    def _compose(name: str, overrides: list[str] | None = None):
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return hcompose(config_name=name, overrides=overrides or [])

    return _compose
