"""Triton MoE kernels compiled for the GPU against transformers' eager Qwen3MoeExperts (CUDA)."""

from __future__ import annotations

import pytest
import torch

from tests.vlm.moe._ref import make_pair, routing

pytestmark = pytest.mark.gpu


def check(fused, eager, x, idx, w, tol: float) -> None:
    """Output and the input / routing-weight gradients equal eager's, tolerance scaled to magnitudes."""
    xf, wf = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    xe, we = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    out, ref = fused(xf, idx, wf), eager(xe, idx, we)
    dy = torch.randn_like(out)
    out.backward(dy)
    ref.backward(dy)
    for a, b in ((out, ref), (xf.grad, xe.grad), (wf.grad, we.grad)):
        scale = b.float().abs().max().item() + 1e-6
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol * scale)


@pytest.mark.parametrize(
    ("t", "skip"),
    [
        (1, ()),  # one token: 2 of 8 experts used, one row in a 64-row block
        (7, (0, 5)),  # experts 0 and 5 receive no token
        (101, (3,)),  # T*k = 202 rows: not a multiple of the 64-row block
    ],
)
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_compiled_kernels_match_eager(compiled_triton, t, skip, dtype, tol):
    e, k, h, i = 8, 2, 128, 96  # I=96: the 64-wide N tiles end in a partial tile
    fused, eager = make_pair(e, h, i, backend="triton")
    fused, eager = fused.cuda(), eager.cuda().to(dtype)
    gu, dn = fused.dequantized(dtype)  # eager holds exactly our weights in this dtype
    eager.gate_up_proj.data, eager.down_proj.data = gu, dn
    idx, w = routing(t, e, k, skip=skip)
    x = torch.randn(t, h, generator=torch.Generator().manual_seed(2))
    check(fused, eager, x.cuda().to(dtype), idx.cuda(), w.cuda().to(dtype), tol)


def test_compiled_kernels_match_eager_at_real_shape(compiled_triton):
    """Qwen3-30B-A3B's layer (E 128, H 2048, I 768, top-8) in bf16, 300 tokens."""
    e, k, h, i, t = 128, 8, 2048, 768, 300
    fused, eager = make_pair(e, h, i, backend="triton")
    fused, eager = fused.cuda(), eager.cuda().bfloat16()
    eager.gate_up_proj.data, eager.down_proj.data = fused.dequantized(torch.bfloat16)
    idx, w = routing(t, e, k, skip=(0, 1))
    x = torch.randn(t, h, generator=torch.Generator().manual_seed(2))
    check(fused, eager, x.cuda().bfloat16(), idx.cuda(), w.cuda().bfloat16(), 3e-2)


def test_triton_equals_torch_path_on_cuda(compiled_triton):
    e, k, h, i, t = 16, 4, 256, 128, 333
    fused, _ = make_pair(e, h, i, backend="triton")
    fused = fused.cuda()
    idx, w = routing(t, e, k)
    x = torch.randn(t, h, generator=torch.Generator().manual_seed(3)).cuda().bfloat16()
    out = fused(x, idx.cuda(), w.cuda().bfloat16())
    fused.backend_name = "torch"
    ref = fused(x, idx.cuda(), w.cuda().bfloat16())
    torch.testing.assert_close(
        out.float(), ref.float(), rtol=2e-2, atol=2e-2 * ref.float().abs().max().item()
    )
