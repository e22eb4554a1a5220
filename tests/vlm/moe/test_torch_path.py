"""The PyTorch reference path against transformers' eager Qwen3MoeExperts (same de-quantized weights)."""

from __future__ import annotations

import pytest
import torch

from tests.vlm.moe._ref import assert_matches_eager, make_pair, routing
from vlm.moe import torch_backend
from vlm.moe.experts import moe_experts
from vlm.moe.torch_backend import TorchBackend


@pytest.mark.parametrize("t", [1, 7, 33])
def test_forward_and_input_grads_match_eager(t):
    e, k, h, i = 8, 2, 64, 32
    fused, eager = make_pair(e, h, i, backend="torch")
    idx, w = routing(t, e, k, skip=(3,))  # expert 3 gets no token
    assert_matches_eager(fused, eager, torch.randn(t, h), idx, w)


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


def _run(fused, backend, x, idx, w):
    """Output and input/routing-weight gradients of the experts through `backend`."""
    xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    out = moe_experts(xg, idx, wg, fused.nf4("gate_up_proj"), fused.nf4("down_proj"), backend)
    out.backward(torch.arange(out.numel(), dtype=out.dtype).view_as(out).sin())
    return out.detach(), xg.grad, wg.grad


@pytest.mark.parametrize("index_add", [True, False])
def test_tiles_and_combines_agree(index_add):
    # Tiles of 3 experts over 10: a tile whose experts all got no token (3-5), one with an empty expert
    # (7), and a short last tile; both combines (index_add on CPU, the pair buffer used off CPU).
    e, k, h, i, t = 10, 2, 64, 32, 21
    fused, eager = make_pair(e, h, i, backend="torch")
    idx, w = routing(t, e, k, skip=(3, 4, 5, 7))
    x = torch.randn(t, h)
    one = _run(fused, TorchBackend(), x, idx, w)  # a single tile
    tiled = _run(fused, TorchBackend(tile_bytes=1, min_experts=3, index_add=index_add), x, idx, w)
    for a, b in zip(one, tiled, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    ref = eager(x, idx, w)
    torch.testing.assert_close(tiled[0], ref, rtol=1e-5, atol=1e-5)


def test_tiles_without_rows_are_not_dequantized(monkeypatch):
    e, k, h, i, t = 12, 2, 64, 32, 5
    fused, _ = make_pair(e, h, i, backend="torch")
    seen: list[int] = []
    real = torch_backend.dequantize_fast

    def spy(wt, dtype):
        seen.append(wt.num_experts)
        return real(wt, dtype)

    monkeypatch.setattr(torch_backend, "dequantize_fast", spy)
    idx, w = routing(t, e, k, skip=tuple(range(4, e)))  # only experts 0-3 get tokens
    _run(fused, TorchBackend(tile_bytes=1, min_experts=4), torch.randn(t, h), idx, w)
    assert seen == [4, 4, 4, 4]  # forward gate_up + down, backward down + gate_up: the first tile only


def test_tiles_with_expert_lora_match_one_tile():
    e, k, h, i, t = 10, 2, 64, 32, 17
    fused, _ = make_pair(e, h, i, backend="torch", lora_r=4)
    with torch.no_grad():  # B starts at zero (a no-op adapter); give it values so the test can fail
        fused.lora.gate_up_B.normal_(0, 0.1)
        fused.lora.down_B.normal_(0, 0.1)
    idx, w = routing(t, e, k, skip=(2, 6))
    x = torch.randn(t, h)
    results = []
    for backend in (TorchBackend(), TorchBackend(tile_bytes=1, min_experts=3)):
        fused.lora.zero_grad()
        xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        out = moe_experts(xg, idx, wg, fused.nf4("gate_up_proj"), fused.nf4("down_proj"), backend, fused.lora)
        out.square().sum().backward()
        grads = [p.grad.clone() for p in fused.lora.parameters()]
        results.append([out.detach(), xg.grad, wg.grad, *grads])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
