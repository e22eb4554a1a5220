"""Per-expert LoRA (low-rank grouped products) against an explicit merged-weight reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.vlm.moe._ref import make_pair, routing


def merged_reference(x, idx, w, gu, dn):
    """Experts output with dense per-expert weights, looping over experts (test code only)."""
    out = torch.zeros_like(x)
    for e in range(gu.shape[0]):
        tok, slot = torch.where(idx == e)
        g, u = (x[tok] @ gu[e].T).chunk(2, dim=-1)
        y = (F.silu(g) * u) @ dn[e].T * w[tok, slot, None]
        out = out.index_add(0, tok, y)
    return out


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_expert_lora_matches_merged_weights(backend):
    e, k, h, i, r, t = 4, 2, 64, 32, 4, 19
    fused, eager = make_pair(e, h, i, backend=backend, lora_r=r, lora_alpha=8.0)
    lora = fused.lora
    torch.manual_seed(5)
    with torch.no_grad():  # B is zero at init (no-op adapter); give it values so the test can fail
        lora.gate_up_B.normal_(0, 0.1)
        lora.down_B.normal_(0, 0.1)
    idx, w = routing(t, e, k, skip=(1,))
    x = torch.randn(t, h, requires_grad=True)
    out = fused(x, idx, w)

    a_gu, b_gu = (
        lora.gate_up_A.detach().clone().requires_grad_(),
        lora.gate_up_B.detach().clone().requires_grad_(),
    )
    a_d, b_d = lora.down_A.detach().clone().requires_grad_(), lora.down_B.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    scale = 8.0 / r
    gu = eager.gate_up_proj + scale * b_gu @ a_gu  # (E, 2I, H): the reference may form B·A
    dn = eager.down_proj + scale * b_d @ a_d
    ref = merged_reference(x2, idx, w, gu, dn)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)

    dy = torch.randn_like(out)
    out.backward(dy)
    ref.backward(dy)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-5)
    for got, want in [(lora.gate_up_A, a_gu), (lora.gate_up_B, b_gu), (lora.down_A, a_d), (lora.down_B, b_d)]:
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-5)
    assert lora.gate_up_B.grad[1].abs().max() == 0  # expert 1 saw no token


def test_fresh_adapter_is_a_no_op_and_base_is_frozen():
    fused, eager = make_pair(4, 64, 32, backend="torch", lora_r=8)
    idx, w = routing(9, 4, 2)
    x = torch.randn(9, 64)
    torch.testing.assert_close(fused(x, idx, w), eager(x, idx, w), rtol=1e-5, atol=1e-5)
    trainable = {n for n, p in fused.named_parameters() if p.requires_grad}
    assert trainable == {"lora.gate_up_A", "lora.gate_up_B", "lora.down_A", "lora.down_B"}
