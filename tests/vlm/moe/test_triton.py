"""Triton kernels (interpreted on CPU) against transformers' eager Qwen3MoeExperts and the PyTorch path."""

from __future__ import annotations

import pytest
import torch

from tests.vlm.moe._ref import assert_matches_eager, make_pair, routing
from vlm.moe.routing import build_plan


@pytest.mark.parametrize(
    ("t", "skip"),
    [
        (1, ()),  # a single token: most experts empty, one row in a 16-row block
        (7, (0, 5)),  # experts 0 and 5 get nothing
        (37, (2,)),  # T*k = 74 rows, not a multiple of the 16-row block
    ],
)
def test_forward_and_grads_match_eager(t, skip):
    e, k, h, i = 8, 2, 64, 48  # I=48: N tiles of 32 end in a partial tile, 2I*H rows straddle blocks
    fused, eager = make_pair(e, h, i, backend="triton")
    idx, w = routing(t, e, k, skip=skip)
    assert_matches_eager(fused, eager, torch.randn(t, h), idx, w)


def test_block_plan_layout():
    idx = torch.tensor([[2, 0], [2, 1], [0, 2]])  # expert 0: 2 pairs, 1: 1, 2: 3, 3: none
    plan = build_plan(idx, num_experts=4, block_m=4)
    assert plan.num_rows == 20  # static bound S + min(E, S)*(m-1) = 6 + 4*3 = 18, rounded up to 4
    assert plan.block_expert.tolist() == [0, 1, 2, -1, -1]
    assert plan.row_pair.tolist()[:12] == [1, 4, 6, 6, 3, 6, 6, 6, 0, 2, 5, 6]
    assert plan.offsets.tolist() == [4, 8, 12, 12]
    assert torch.equal(plan.row_pair[plan.pair_row], torch.arange(6))


def test_triton_equals_torch_path_bf16():
    e, k, h, i, t = 4, 2, 64, 32, 20
    fused, _ = make_pair(e, h, i, backend="triton")
    idx, w = routing(t, e, k)
    x = torch.randn(t, h, dtype=torch.bfloat16)
    out = fused(x, idx, w.bfloat16())
    fused.backend_name = "torch"
    ref = fused(x, idx, w.bfloat16())
    # Same bf16 weights and inputs; the kernels accumulate in fp32 like the reference GEMMs, so only the
    # bf16 rounding of intermediates (h) and of the sum over k differ.
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
