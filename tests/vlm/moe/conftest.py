"""MoE test setup and the real-shape fixtures.

Triton runs in its interpreter on CPU, so the kernels are tested without a GPU: `TRITON_INTERPRET` is read
when a kernel is decorated, and `vlm.moe` imports its kernels lazily, so setting it here (before any test
module of this folder imports them) is enough.

`real_moe_dir`: Qwen3-30B-A3B's shapes (conf/model/qwen3_30b_a3b.yaml's arch: hidden 2048, 32/4 heads,
head_dim 128, 128 experts top-8 of width 768, vocab 151,936) with two layers (`REAL_LAYERS`: the test-time
budget; `python -m bench.moe --load` measures 2 and 4), seeded random weights, saved in bf16 in 1 GB
shards like the hub's (3.7 GB). `real_nf4` is its NF4 checkpoint, made once in a
subprocess that also reports the load's peak RSS and time (`bench.moe.measure_load`, which the
loading benchmark uses too).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import replace

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")

from bench.moe import measure_load, save_real_moe

REAL_LAYERS = 2


def real_arch(typed, layers: int = REAL_LAYERS):
    return replace(typed("train", ["model=qwen3_30b_a3b"]).model.arch, num_hidden_layers=layers)


@pytest.fixture(scope="session")
def real_moe_dir(typed, tmp_path_factory):
    out = tmp_path_factory.mktemp("qwen3_30b_a3b_real")
    yield save_real_moe(real_arch(typed), out / "bf16")
    shutil.rmtree(out, ignore_errors=True)  # gigabytes: not left for pytest's kept basetemps


@pytest.fixture(scope="session")
def real_nf4(real_moe_dir, tmp_path_factory):
    """(NF4 checkpoint of `real_moe_dir`, the measurements of the load that made it)."""
    out = tmp_path_factory.mktemp("qwen3_30b_a3b_real_nf4")
    stats = measure_load(real_moe_dir, "bfloat16", save_to=out / "nf4")
    yield out / "nf4", stats
    shutil.rmtree(out, ignore_errors=True)
