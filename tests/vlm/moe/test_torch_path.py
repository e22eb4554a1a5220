"""The PyTorch reference path against transformers' eager Qwen3MoeExperts (same de-quantized weights)."""

from __future__ import annotations

import pytest
import torch

from tests.vlm.moe._ref import make_pair, routing


@pytest.mark.parametrize("t", [1, 7, 33])
def test_forward_and_input_grads_match_eager(t):
    e, k, h, i = 8, 2, 64, 32
    fused, eager = make_pair(e, h, i, backend="torch")
    idx, w = routing(t, e, k, skip=(3,))  # expert 3 gets no token
    x = torch.randn(t, h, requires_grad=True)
    wf = w.clone().requires_grad_(True)
    out = fused(x, idx, wf)
    x2 = x.detach().clone().requires_grad_(True)
    we = w.clone().requires_grad_(True)
    ref = eager(x2, idx, we)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    dy = torch.randn_like(out)
    out.backward(dy)
    ref.backward(dy)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(wf.grad, we.grad, rtol=1e-5, atol=1e-5)


def test_bf16_forward_close_to_eager():
    e, k, h, i, t = 8, 2, 64, 32, 16
    fused, eager = make_pair(e, h, i, backend="torch")
    eager.to(torch.bfloat16)
    idx, w = routing(t, e, k)
    x = torch.randn(t, h, dtype=torch.bfloat16)
    out = fused(x, idx, w.bfloat16())
    ref = eager(x, idx, w.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
