"""NF4 experts storage: bit-identical to bitsandbytes.functional, per expert, and the memory formula."""

from __future__ import annotations

import bitsandbytes.functional as bnbf
import pytest
import torch

from vlm.moe.nf4 import (
    dequantize_fast,
    dequantize_nf4,
    dynamic_code,
    expert_bytes,
    nf4_code,
    quantize_nf4,
)


def test_code_tables_are_bitsandbytes():
    assert torch.equal(nf4_code(), bnbf.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(dynamic_code(), bnbf.create_dynamic_map())


@pytest.mark.parametrize(
    ("shape", "dtype"),
    [((3, 96, 64), torch.float32), ((2, 64, 640), torch.bfloat16), ((2, 128, 320), torch.float16)],
)
def test_quantize_and_dequantize_match_bitsandbytes_per_expert(shape, dtype):
    torch.manual_seed(0)
    w = (torch.randn(shape) * 0.02).to(dtype)
    w[0, 0, :64] = 0  # an all-zero block: absmax 0 must not produce NaN
    w[1, 3, 5] = 0.5  # an outlier dominating its block
    t = quantize_nf4(w)
    nb = shape[1] * shape[2] // 64
    assert t.q.shape == (shape[0], shape[1] * shape[2] // 2) and t.absmax.shape == (shape[0], nb)
    for out_dtype in (torch.float32, torch.bfloat16, torch.float16):
        ours = dequantize_nf4(t, out_dtype)
        fast = dequantize_fast(t, out_dtype)
        for e in range(shape[0]):
            q, st = bnbf.quantize_4bit(w[e], blocksize=64, quant_type="nf4", compress_statistics=True)
            assert torch.equal(q.view(-1), t.q[e])
            assert torch.equal(st.absmax, t.absmax[e])
            assert torch.equal(st.state2.absmax, t.absmax2[e])
            assert torch.equal(st.offset, t.offset[e])
            st.dtype = out_dtype
            ref = bnbf.dequantize_4bit(q, st)
            assert torch.equal(ours[e], ref), (e, out_dtype)
            assert torch.equal(fast[e], ref), (e, out_dtype)


def test_dequantize_subset_of_experts():
    w = torch.randn(5, 64, 128)
    t = quantize_nf4(w)
    idx = torch.tensor([4, 1])
    assert torch.equal(dequantize_nf4(t, experts=idx), dequantize_nf4(t)[idx])


def test_round_trip_error_is_nf4_sized():
    # NF4's largest gap is 0.30 of the block absmax; a wrong nibble order or absmax would be far off.
    w = torch.randn(2, 64, 256)
    err = (dequantize_nf4(quantize_nf4(w)) - w).abs()
    amax = w.reshape(2, -1, 64).abs().amax(-1, keepdim=True)
    assert (err.reshape(2, -1, 64) <= 0.16 * amax + 1e-6).all()


def test_rejects_shapes_that_split_a_block():
    with pytest.raises(ValueError, match="divisible by 64"):
        quantize_nf4(torch.randn(2, 3, 10))


def test_expert_bytes_matches_stored_tensors_and_real_shape_fits():
    e, h, i = 4, 128, 64
    gu, dn = quantize_nf4(torch.randn(e, 2 * i, h)), quantize_nf4(torch.randn(e, h, i))
    stored = sum(x.numel() * x.element_size() for t in (gu, dn) for x in (t.q, t.absmax, t.absmax2, t.offset))
    assert expert_bytes(e, h, i) == stored + 4 * (16 + 256)
    # Qwen3-30B-A3B: 48 layers of 128 experts, hidden 2048, expert width 768.
    per_layer = expert_bytes(128, 2048, 768)
    # per expert: gate_up 1_572_864 codes + 49_152 absmax + 192*4 absmax2 + 4 offset = 1_622_788,
    # down 786_432 + 24_576 + 96*4 + 4 = 811_396; x128 experts, plus the two code tables.
    assert per_layer == 128 * (1_622_788 + 811_396) + 4 * 272
    assert per_layer * 48 <= 17e9
    assert 0.51 < per_layer / (128 * 3 * 2048 * 768) < 0.53


def test_rows_narrower_than_a_block_use_flat_blocks_like_bitsandbytes():
    # For K % 64 != 0 a block spans rows. bitsandbytes quantizes flat runs of 64; quantizing each expert
    # flattened to one row (where its CPU dequant kernel is exact) gives the reference for both functions.
    torch.manual_seed(3)
    w = torch.randn(3, 64, 32) * 0.05
    t = quantize_nf4(w)
    for e in range(3):
        q, st = bnbf.quantize_4bit(
            w[e].reshape(1, -1), blocksize=64, quant_type="nf4", compress_statistics=True
        )
        assert torch.equal(q.view(-1), t.q[e]) and torch.equal(st.absmax, t.absmax[e])
        ref = bnbf.dequantize_4bit(q, st).reshape(64, 32)
        assert torch.equal(dequantize_nf4(t)[e], ref)
        assert torch.equal(dequantize_fast(t, torch.float32)[e], ref)
