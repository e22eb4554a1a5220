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

A backend provides `gate_up`, `down` (combined into token order), `grad_x` (the input gradient of
gate_up, combined into token order), `grad_h` (dy[token] @ Wd[e] per row) and `block_m`;
`vlm.moe.torch_backend.TorchBackend` is the reference, `vlm.moe.triton_backend.TritonBackend` the
fused kernels.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from vlm.moe.nf4 import NF4Experts
from vlm.moe.routing import RoutingPlan, build_plan
from vlm.moe.torch_backend import TorchBackend

__all__ = ["Backend", "TorchBackend", "moe_experts", "silu_mul_backward"]


class Backend(Protocol):
    block_m: int

    def gate_up(
        self, x: torch.Tensor, plan: RoutingPlan, w: NF4Experts, extra: torch.Tensor | None, keep_pre: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """h = silu(gate) * up (P, I) and, if asked, pre = [gate | up] (P, 2I)."""
        ...

    def down(
        self,
        h: torch.Tensor,
        plan: RoutingPlan,
        w: NF4Experts,
        row_weight: torch.Tensor,
        extra: torch.Tensor | None,
    ) -> torch.Tensor:
        """sum over each token's k rows of row_weight * (h @ Wd[e]^T + extra): (T, H)."""
        ...

    def grad_x(self, dpre: torch.Tensor, plan: RoutingPlan, w: NF4Experts) -> torch.Tensor:
        """sum over each token's k rows of dpre @ Wgu[e]: (T, H)."""
        ...

    def grad_h(self, dy: torch.Tensor, plan: RoutingPlan, w: NF4Experts) -> torch.Tensor:
        """dy[token] @ Wd[e] per row: (P, I)."""
        ...


def silu_mul_backward(pre: torch.Tensor, dh: torch.Tensor) -> torch.Tensor:
    """d(silu(g) * u) for pre = [g | u] (R, 2I): returns [dg | du] (R, 2I).

    The same ops, in the same dtype, as autograd's backward of transformers' `act_fn(gate) * up`
    (dg = silu_backward(dh * u, g), du = dh * silu(g)), written straight into one buffer.
    """
    gate, up = pre.chunk(2, dim=-1)
    out = torch.empty_like(pre)
    dgate, dup = out.chunk(2, dim=-1)
    torch.mul(dh, F.silu(gate), out=dup)
    torch.ops.aten.silu_backward.grad_input(dh * up, gate, grad_input=dgate)
    return out


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
            dx = ctx.backend.grad_x(dpre, plan, ctx.w)  # (T, H)
        dextra = dpre if ctx.needs_input_grad[1] else None
        return dx, dextra, None, None, None


class _Down(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, top_k_weights, extra, plan: RoutingPlan, w: NF4Experts, backend: Backend):
        row_weight = plan.pairs_to_rows(top_k_weights.reshape(-1).to(h.dtype))  # (P,) 0 on padding
        ctx.plan, ctx.w, ctx.backend, ctx.wdtype = plan, w, backend, top_k_weights.dtype
        ctx.save_for_backward(h, row_weight, extra)
        return backend.down(h, plan, w, row_weight, extra)  # (T, H)

    @staticmethod
    def backward(ctx, dy):
        h, row_weight, extra = ctx.saved_tensors
        plan, dy = ctx.plan, dy.contiguous()
        # g = dy[token] @ Wd[e]: the gradient of the unweighted expert output w.r.t. h.
        g = ctx.backend.grad_h(dy, plan, ctx.w)  # (P, I)
        dh = g * row_weight[:, None].to(g.dtype) if ctx.needs_input_grad[0] else None
        dw = dextra = None
        if ctx.needs_input_grad[1]:
            # d w_row = <dy[token], expert output> = <g, h> (+ <dy[token], extra>), no output kept.
            drow = (g * h).sum(-1, dtype=torch.float32)  # (P,) products as eager's autograd rounds them
            if extra is not None:
                drow = drow + (plan.gather_tokens(dy) * extra).sum(-1, dtype=torch.float32)
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
    extra_gu = lora.gate_up(x, plan) if lora is not None else None  # (P, 2I) | None
    h = _GateUp.apply(x, extra_gu, plan, gate_up, backend)  # (P, I)
    extra_d = lora.down(h, plan) if lora is not None else None  # (P, H) | None
    return _Down.apply(h, top_k_weights, extra_d, plan, down, backend)
