"""Triton kernels: grouped GEMMs over expert-aligned row blocks with NF4 de-quantized in the K-loop.

Each program owns BLOCK_M rows of the routing plan (all of one expert, `block_expert[pid_m]`, -1 for an
unused block) and BLOCK_N output columns. Per K step it loads the activations and the packed NF4 codes
of the expert's weight tile, looks the nibbles up in the 16-entry NF4 table and scales them by the
block absmax, itself de-quantized on the fly (dynamic-map code * absmax2 + offset), so no 16-bit copy of
the experts ever exists in memory. Weight element (n, k) of an expert `[N, K]` is flat index n*K + k:
byte flat//2 (high nibble when flat is even), absmax flat//64, absmax2 flat//(64*256).

- `moe_nt_kernel`  C = A @ W[e]^T. GATED: gate and up tiles (rows n and N+n) in two accumulators and
  SiLU(gate)*up in the epilogue (gate_up). Otherwise the routing weight is applied in the epilogue and
  rows are scattered straight to pair order (down).
- `moe_nn_kernel`  C = A @ W[e]: the input-gradient products of the backward pass.
Rows whose activations are gathered by token (A_GATHER) read `row_token`; padding rows point one past
the end and are masked.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _nf4_tile(q_ptr, am_ptr, am2_ptr, off, code_ptr, code2_ptr, flat, mask):
    """De-quantize the NF4 weights at flat indices `flat` (any 2D shape) of one expert to float32."""
    byte = tl.load(q_ptr + flat // 2, mask=mask, other=0).to(tl.int32)
    nib = (byte >> ((1 - flat % 2) * 4)) & 0xF
    val = tl.load(code_ptr + nib, mask=mask, other=0.0)
    aq = tl.load(am_ptr + flat // 64, mask=mask, other=0).to(tl.int32)
    absmax = tl.load(code2_ptr + aq, mask=mask, other=0.0) * tl.load(
        am2_ptr + flat // 16384, mask=mask, other=0.0
    )
    absmax = absmax + off
    return val * absmax


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    # IEEE: fp32 products at full precision (fp32 inputs, and 16-bit inputs under TRITON_INTERPRET,
    # whose NumPy dot mishandles bf16 bit patterns); otherwise 16-bit tensor-core products.
    if IEEE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def moe_nt_kernel(
    a_ptr,  # (T or P, K) activations
    row_token_ptr,  # (P,) token of each row (A_GATHER) / unused
    row_pair_ptr,  # (P,) pair of each row, S on padding
    block_expert_ptr,  # (P / BLOCK_M,)
    q_ptr, am_ptr, am2_ptr, off_ptr,  # NF4 experts: (E, N_all*K/2) u8, (E, nb) u8, (E, nb2) f32, (E,) f32
    code_ptr, code2_ptr,  # (16,) f32, (256,) f32
    extra_ptr,  # (P, N_all) additive term (LoRA) or dummy
    pre_ptr,  # (P, 2N) pre-activation out (GATED and STORE_PRE) or dummy
    w_ptr,  # (S,) routing weights (not GATED)
    c_ptr,  # GATED: (P, N) SiLU(gate)*up; else (S, N) weighted rows in pair order
    num_tokens, num_pairs, N, K,
    stride_a, stride_q, stride_am, stride_am2,
    A_GATHER: tl.constexpr, GATED: tl.constexpr, HAS_EXTRA: tl.constexpr, STORE_PRE: tl.constexpr,
    IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_m)
    if e < 0:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(row_pair_ptr + rows)
    valid = pair < num_pairs
    if A_GATHER:  # noqa: SIM108  (a constexpr branch, resolved at compile time)
        arow = tl.load(row_token_ptr + rows)
    else:
        arow = rows
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    q_e, am_e, am2_e = q_ptr + e * stride_q, am_ptr + e * stride_am, am2_ptr + e * stride_am2
    off = tl.load(off_ptr + e)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < K
        a = tl.load(
            a_ptr + arow[:, None] * stride_a + ks[None, :], mask=valid[:, None] & kmask[None, :], other=0.0
        )
        wmask = kmask[:, None] & cmask[None, :]
        flat = cols[None, :] * K + ks[:, None]  # (BLOCK_K, BLOCK_N): W^T tile
        w = _nf4_tile(q_e, am_e, am2_e, off, code_ptr, code2_ptr, flat, wmask).to(a.dtype)
        acc = _dot(a, w, acc, IEEE)
        if GATED:
            wu = _nf4_tile(q_e, am_e, am2_e, off, code_ptr, code2_ptr, flat + N * K, wmask).to(a.dtype)
            acc_up = _dot(a, wu, acc_up, IEEE)
    omask = valid[:, None] & cmask[None, :]
    if GATED:
        if HAS_EXTRA:
            ex = extra_ptr + rows[:, None] * (2 * N) + cols[None, :]
            acc += tl.load(ex, mask=omask, other=0.0).to(tl.float32)
            acc_up += tl.load(ex + N, mask=omask, other=0.0).to(tl.float32)
        if STORE_PRE:
            tl.store(
                pre_ptr + rows[:, None] * (2 * N) + cols[None, :],
                acc.to(pre_ptr.dtype.element_ty),
                mask=omask,
            )
            tl.store(
                pre_ptr + rows[:, None] * (2 * N) + N + cols[None, :],
                acc_up.to(pre_ptr.dtype.element_ty),
                mask=omask,
            )
        h = acc * tl.sigmoid(acc) * acc_up  # SiLU(gate) * up
        tl.store(c_ptr + rows[:, None] * N + cols[None, :], h.to(c_ptr.dtype.element_ty), mask=omask)
    else:
        if HAS_EXTRA:
            acc += tl.load(extra_ptr + rows[:, None] * N + cols[None, :], mask=omask, other=0.0).to(
                tl.float32
            )
        wt = tl.load(w_ptr + pair, mask=valid, other=0.0).to(tl.float32)
        out = (acc * wt[:, None]).to(c_ptr.dtype.element_ty)
        tl.store(c_ptr + pair[:, None] * N + cols[None, :], out, mask=omask)


@triton.jit
def moe_nn_kernel(
    a_ptr,  # (T or P, K) incoming gradient
    row_token_ptr, row_pair_ptr, block_expert_ptr,
    q_ptr, am_ptr, am2_ptr, off_ptr, code_ptr, code2_ptr,
    c_ptr,  # (P, N) out
    num_pairs, N, K,  # the expert weight is [K, N] here: rows are the reduction dim
    stride_a, stride_q, stride_am, stride_am2,
    A_GATHER: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_m)
    if e < 0:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    valid = tl.load(row_pair_ptr + rows) < num_pairs
    if A_GATHER:  # noqa: SIM108  (a constexpr branch, resolved at compile time)
        arow = tl.load(row_token_ptr + rows)
    else:
        arow = rows
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    q_e, am_e, am2_e = q_ptr + e * stride_q, am_ptr + e * stride_am, am2_ptr + e * stride_am2
    off = tl.load(off_ptr + e)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < K
        a = tl.load(
            a_ptr + arow[:, None] * stride_a + ks[None, :], mask=valid[:, None] & kmask[None, :], other=0.0
        )
        flat = ks[:, None] * N + cols[None, :]  # (BLOCK_K, BLOCK_N): W tile
        w = _nf4_tile(q_e, am_e, am2_e, off, code_ptr, code2_ptr, flat, kmask[:, None] & cmask[None, :])
        acc = _dot(a, w.to(a.dtype), acc, IEEE)
    tl.store(
        c_ptr + rows[:, None] * N + cols[None, :],
        acc.to(c_ptr.dtype.element_ty),
        mask=valid[:, None] & cmask[None, :],
    )


def grid(num_rows: int, block_m: int, n: int, block_n: int) -> tuple[int, int]:
    return (num_rows // block_m, triton.cdiv(n, block_n))
