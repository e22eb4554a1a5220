"""Launchers for the fused Triton kernels, implementing the backend interface of `vlm.moe.experts`.

Tile sizes: on CUDA 64x64x64 (not autotuned: no GPU was available when this was written); under
`TRITON_INTERPRET=1` on CPU 16x32x32, because the interpreter executes every tile op in NumPy and the
tests need small blocks to cover partial blocks, empty experts and single tokens quickly.
"""

from __future__ import annotations

from functools import cache

import torch
from triton import knobs

from vlm.moe.kernels import grid, moe_nn_kernel, moe_nt_kernel
from vlm.moe.nf4 import NF4Experts, dynamic_code, nf4_code
from vlm.moe.routing import RoutingPlan


def _ieee(t: torch.Tensor) -> bool:
    """Full-precision fp32 dots for fp32 inputs, and always in the interpreter (see kernels._dot)."""
    return t.dtype == torch.float32 or knobs.runtime.interpret


@cache
def _tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return nf4_code(device), dynamic_code(device)


class TritonBackend:
    """Fused NF4 grouped GEMMs; the plan is block-aligned to `block_m` rows per expert block."""

    def __init__(self, block_m: int | None = None, block_n: int | None = None, block_k: int | None = None):
        on_gpu = torch.cuda.is_available()
        self.block_m = block_m or (64 if on_gpu else 16)
        self.block_n = block_n or (64 if on_gpu else 32)
        self.block_k = block_k or (64 if on_gpu else 32)

    def _weights(self, w: NF4Experts):
        code, code2 = _tables(w.q.device)
        return (w.q, w.absmax, w.absmax2, w.offset, code, code2)

    def _strides(self, w: NF4Experts) -> tuple[int, int, int]:
        return w.q.stride(0), w.absmax.stride(0), w.absmax2.stride(0)

    def gate_up(self, x, plan: RoutingPlan, w: NF4Experts, extra, keep_pre):
        x = x.contiguous()
        p, i, h = plan.num_rows, w.shape[1] // 2, w.shape[2]
        out = x.new_zeros(p, i)  # (P, I) blocks past the last expert stay zero
        pre = x.new_zeros(p, 2 * i) if keep_pre else out
        moe_nt_kernel[grid(p, self.block_m, i, self.block_n)](
            x, plan.row_token, plan.row_pair, plan.block_expert, *self._weights(w),
            extra.contiguous() if extra is not None else out, pre, out, out,
            plan.num_tokens, plan.num_pairs, i, h, x.stride(0), *self._strides(w),
            A_GATHER=True, GATED=True, HAS_EXTRA=extra is not None, STORE_PRE=keep_pre,
            IEEE=_ieee(x),
            BLOCK_M=self.block_m, BLOCK_N=self.block_n, BLOCK_K=self.block_k,
        )  # fmt: skip
        return out, (pre if keep_pre else None)

    def down(self, h, plan: RoutingPlan, w: NF4Experts, row_weight, extra):
        h = h.contiguous()
        hid, i = w.shape[1], w.shape[2]
        pairs = h.new_empty(plan.num_pairs, hid)  # (S, H): every pair is written exactly once
        # The routing weights are read per pair; padding rows are masked, so row_weight's zeros are not
        # needed here (it serves the PyTorch path and the backward).
        w_pairs = plan.rows_to_pairs(row_weight) if plan.num_pairs else row_weight
        moe_nt_kernel[grid(plan.num_rows, self.block_m, hid, self.block_n)](
            h, plan.row_token, plan.row_pair, plan.block_expert, *self._weights(w),
            extra.contiguous() if extra is not None else h, h, w_pairs.contiguous(), pairs,
            plan.num_tokens, plan.num_pairs, hid, i, h.stride(0), *self._strides(w),
            A_GATHER=False, GATED=False, HAS_EXTRA=extra is not None, STORE_PRE=False,
            IEEE=_ieee(h),
            BLOCK_M=self.block_m, BLOCK_N=self.block_n, BLOCK_K=self.block_k,
        )  # fmt: skip
        return pairs.view(plan.num_tokens, plan.top_k, hid).sum(1)  # (T, H): no atomics

    def grad_x(self, dpre, plan: RoutingPlan, w: NF4Experts):
        return plan.sum_over_k(self._grad_rows(dpre, plan, w, gather=False))  # (T, H)

    def grad_h(self, dy, plan: RoutingPlan, w: NF4Experts):
        return self._grad_rows(dy, plan, w, gather=True)  # (P, I)

    def _grad_rows(self, a, plan: RoutingPlan, w: NF4Experts, gather: bool):
        a = a.contiguous()
        k_dim, n = w.shape[1], w.shape[2]  # weight [E, K, N]: reduce over its rows
        out = a.new_zeros(plan.num_rows, n)
        moe_nn_kernel[grid(plan.num_rows, self.block_m, n, self.block_n)](
            a, plan.row_token, plan.row_pair, plan.block_expert, *self._weights(w), out,
            plan.num_pairs, n, k_dim, a.stride(0), *self._strides(w),
            A_GATHER=gather, IEEE=_ieee(a),
            BLOCK_M=self.block_m, BLOCK_N=self.block_n, BLOCK_K=self.block_k,
        )  # fmt: skip
        return out
