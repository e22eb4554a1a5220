"""Fixtures for the evaluator tests: the offline Qwen3 tokenizer, the tiny decoder's directory, and a
small hand-written Korean multiple-choice set in the KMMLU layout (generated into tmp, not committed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.eval.kmmlu_fixture import write_kmmlu_fixture


@pytest.fixture(scope="session")
def kmmlu_dir(tmp_path_factory) -> Path:
    return write_kmmlu_fixture(tmp_path_factory.mktemp("kmmlu"))


@pytest.fixture(scope="session")
def tokenizer():
    from vlm.model.tokenizer import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(compose) -> Path:
    """The seeded tiny random Qwen3 of conf/model/qwen3_tiny.yaml, saved like a real checkpoint."""
    from vlm.config import to_typed
    from vlm.model.decoder import tiny_base_dir

    model = to_typed(compose("kmmlu")).model
    return tiny_base_dir(model.arch, model.init_seed)
