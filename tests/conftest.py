"""Test-wide setup: offline hub, Triton's CPU interpreter, the typed-config composer."""

from __future__ import annotations

import os

# Set before anything imports transformers or triton.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest

import vlm.config  # registers the structured-config schemas with Hydra

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def compose():
    """hydra.compose over the real conf/ tree: compose("train", ["gpu=l4", ...]) → DictConfig."""
    return vlm.config.compose


@pytest.fixture(scope="session")
def typed(compose):
    """compose(...) turned into the dataclass objects the product reads: typed("train", [...])."""

    def _typed(name: str, overrides: list[str] | None = None):
        return vlm.config.to_typed(compose(name, overrides or []))

    return _typed
