"""NF4 experts on CUDA: de-quantization equal to bitsandbytes' CUDA `dequantize_4bit`, bit for bit."""

from __future__ import annotations

import pytest
import torch

from vlm.moe.nf4 import NF4Experts, dequantize_fast, dequantize_nf4, quantize_nf4

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantize_equals_bitsandbytes_cuda(out_dtype):
    import bitsandbytes.functional as bnbf

    torch.manual_seed(0)
    w = (torch.randn(3, 256, 192) * 0.02).cuda()
    w[1, 0, :64] = 0  # an all-zero block
    w[2, 3, 5] = 0.5  # an outlier dominating its block
    qs, states = zip(*(bnbf.quantize_4bit(w[e], blocksize=64, quant_type="nf4", compress_statistics=True)
                       for e in range(3)), strict=True)  # fmt: skip
    # bitsandbytes' own CUDA quantization, in our layout: every statistic is per expert.
    t = NF4Experts(torch.stack([q.view(-1) for q in qs]), torch.stack([s.absmax for s in states]),
                   torch.stack([s.state2.absmax for s in states]), torch.stack([s.offset.reshape(()) for s in states]),
                   (3, 256, 192))  # fmt: skip
    ours, fast = dequantize_nf4(t, out_dtype), dequantize_fast(t, out_dtype)
    for e in range(3):
        states[e].dtype = out_dtype
        ref = bnbf.dequantize_4bit(qs[e], states[e])
        assert ref.is_cuda and torch.equal(ours[e], ref), e
        assert torch.equal(fast[e], ref), e


def test_quantize_on_cuda_equals_bitsandbytes_cuda():
    import bitsandbytes.functional as bnbf

    torch.manual_seed(1)
    w = (torch.randn(2, 128, 256) * 0.02).to(torch.bfloat16).cuda()
    t = quantize_nf4(w)
    for e in range(2):
        q, st = bnbf.quantize_4bit(w[e], blocksize=64, quant_type="nf4", compress_statistics=True)
        assert torch.equal(q.view(-1), t.q[e])
        assert torch.equal(st.absmax, t.absmax[e]) and torch.equal(st.state2.absmax, t.absmax2[e])
        st.dtype = torch.bfloat16
        assert torch.equal(dequantize_nf4(t, torch.bfloat16)[e], bnbf.dequantize_4bit(q, st))
