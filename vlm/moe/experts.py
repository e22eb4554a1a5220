"""The MoE experts computation, shared by the Triton and PyTorch backends, with a hand-written backward.

    x (T, H) ──plan: pairs sorted by expert──► rows (P)
      gate_up: pre = x[token] @ Wgu[e]^T (+ LoRA)            (P, 2I)   NF4 de-quantized per expert
               h   = silu(pre[:, :I]) * pre[:, I:]           (P, I)    fused in the epilogue
      down:    y   = w_row * (h @ Wd[e]^T (+ LoRA))          (P, H)    routing weight in the epilogue
      combine: out[t] = sum_j y[row of (t, j)]               (T, H)    deterministic, no atomics

The expert weights are frozen NF4 buffers, so the backward only computes what flows to trainable
things: the input gradient (through both grouped products, NF4 de-quantized again rather than kept),
the routing-weight gradient (so the router and, through it, the hidden states get theirs, as in
transformers' eager code) and the gradients of the optional per-expert LoRA terms, which enter as
additive `extra` inputs computed by autograd outside (see `vlm.moe.lora`).

A backend provides four operations (`gate_up`, `down`, `grad_rows`, `block_m`); `TorchBackend` is the
reference, `vlm.moe.triton_backend.TritonBackend` the fused kernels.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from vlm.moe.grouped import grouped_mm
from vlm.moe.nf4 import NF4Experts, dequantize_fast
from vlm.moe.routing import RoutingPlan, build_plan


class Backend(Protocol):
    block_m: int

    def gate_up(
        self, x: torch.Tensor, plan: RoutingPlan, w: NF4Experts, extra: torch.Tensor | None, keep_pre: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]: ...

    def down(
        self,
        h: torch.Tensor,
        plan: RoutingPlan,
        w: NF4Experts,
        row_weight: torch.Tensor,
        extra: torch.Tensor | None,
    ) -> torch.Tensor: ...

    def grad_rows(self, a: torch.Tensor, plan: RoutingPlan, w: NF4Experts, gather: bool) -> torch.Tensor: ...


class TorchBackend:
    """Reference path: de-quantize a layer's experts, then grouped products over the sorted rows."""

    block_m = 1  # no padding: rows are exactly the sorted pairs

    def gate_up(self, x, plan, w, extra, keep_pre):
        wgu = dequantize_fast(w, x.dtype)  # (E, 2I, H)
        pre = grouped_mm(plan.gather_tokens(x), wgu.transpose(1, 2), plan.offsets)  # (P, 2I)
        if extra is not None:
            pre = pre + extra
        gate, up = pre.chunk(2, dim=-1)
        return F.silu(gate) * up, (pre if keep_pre else None)  # (P, I)

    def down(self, h, plan, w, row_weight, extra):
        wd = dequantize_fast(w, h.dtype)  # (E, H, I)
        y = grouped_mm(h, wd.transpose(1, 2), plan.offsets)  # (P, H)
        if extra is not None:
            y = y + extra
        return plan.rows_to_pairs(y * row_weight[:, None])  # (S, H)

    def grad_rows(self, a, plan, w, gather):
        wt = dequantize_fast(w, a.dtype)  # (E, N, K): rows @ W[e] maps N-space back to K-space
        rows = plan.gather_tokens(a) if gather else a
        return grouped_mm(rows.contiguous(), wt, plan.offsets)  # (P, K)


def silu_mul_backward(pre: torch.Tensor, dh: torch.Tensor) -> torch.Tensor:
    """d(silu(g) * u) for pre = [g | u]: returns [dg | du], computed in float32."""
    gate, up = pre.float().chunk(2, dim=-1)
    dh = dh.float()
    sig = torch.sigmoid(gate)
    dgate = dh * up * sig * (1 + gate * (1 - sig))
    dup = dh * gate * sig
    return torch.cat((dgate, dup), dim=-1).to(pre.dtype)


class _GateUp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, extra, plan: RoutingPlan, w: NF4Experts, backend: Backend):
        keep = any(ctx.needs_input_grad[:2])
        h, pre = backend.gate_up(x, plan, w, extra, keep)
        ctx.plan, ctx.w, ctx.backend = plan, w, backend
        ctx.save_for_backward(pre)
        return h

    @staticmethod
    def backward(ctx, dh):
        (pre,) = ctx.saved_tensors
        plan, dpre = ctx.plan, silu_mul_backward(pre, dh)  # (P, 2I)
        dx = None
        if ctx.needs_input_grad[0]:
            rows = ctx.backend.grad_rows(dpre, plan, ctx.w, gather=False)  # (P, H)
            dx = plan.sum_over_k(rows)  # (T, H)
        dextra = dpre if ctx.needs_input_grad[1] else None
        return dx, dextra, None, None, None


class _Down(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, top_k_weights, extra, plan: RoutingPlan, w: NF4Experts, backend: Backend):
        row_weight = plan.pairs_to_rows(top_k_weights.reshape(-1).to(h.dtype))  # (P,) 0 on padding
        pairs = backend.down(h, plan, w, row_weight, extra)  # (S, H) weighted
        ctx.plan, ctx.w, ctx.backend, ctx.wdtype = plan, w, backend, top_k_weights.dtype
        ctx.save_for_backward(h, row_weight, extra)
        return pairs.view(plan.num_tokens, plan.top_k, -1).sum(1)  # (T, H)

    @staticmethod
    def backward(ctx, dy):
        h, row_weight, extra = ctx.saved_tensors
        plan, dy = ctx.plan, dy.contiguous()
        # g = dy[token] @ Wd[e]: the gradient of the unweighted expert output w.r.t. h.
        g = ctx.backend.grad_rows(dy, plan, ctx.w, gather=True)  # (P, I)
        dh = (g * row_weight[:, None]).to(h.dtype) if ctx.needs_input_grad[0] else None
        dw = dextra = None
        if ctx.needs_input_grad[1]:
            # d w_row = <dy[token], expert output> = <g, h> (+ <dy[token], extra>), no output kept.
            drow = (g.float() * h.float()).sum(-1)  # (P,)
            if extra is not None:
                drow = drow + (plan.gather_tokens(dy).float() * extra.float()).sum(-1)
            dw = plan.rows_to_pairs(drow).view(plan.num_tokens, plan.top_k).to(ctx.wdtype)
        if ctx.needs_input_grad[2]:
            dextra = (plan.gather_tokens(dy) * row_weight[:, None]).to(extra.dtype)
        return dh, dw, dextra, None, None, None


def moe_experts(
    x: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up: NF4Experts,
    down: NF4Experts,
    backend: Backend,
    lora=None,  # vlm.moe.lora.ExpertLoRA | None
) -> torch.Tensor:
    """Experts output (T, H) for `x (T, H)` routed by `top_k_index/top_k_weights (T, k)`."""
    plan = build_plan(top_k_index, gate_up.num_experts, backend.block_m)
    extra_gu = lora.gate_up(plan.gather_tokens(x), plan) if lora is not None else None
    h = _GateUp.apply(x, extra_gu, plan, gate_up, backend)  # (P, I)
    extra_d = lora.down(h, plan) if lora is not None else None
    return _Down.apply(h, top_k_weights, extra_d, plan, down, backend)
