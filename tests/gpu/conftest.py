"""GPU tests (`-m gpu`): skipped without CUDA; the Triton ones need compiled (not interpreted) kernels.

The kit runs them as `TRITON_INTERPRET=0 pytest -m gpu tests/gpu` (bench/gpu/tests.py); the suite's root
conftest defaults TRITON_INTERPRET to 1 for the CPU tests, and Triton reads it when a kernel is
decorated, so a whole-suite run on a GPU machine skips the compiled-kernel tests with that reason.
"""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture
def compiled_triton():
    from triton import knobs

    if knobs.runtime.interpret:
        pytest.skip("Triton is interpreted in this process: run TRITON_INTERPRET=0 pytest -m gpu tests/gpu")
