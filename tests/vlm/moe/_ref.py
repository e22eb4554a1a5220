"""Shared builders for the MoE tests: a transformers eager experts module on the de-quantized weights."""

from __future__ import annotations

import torch
from transformers import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

from vlm.moe import FusedMoeExperts


def make_pair(e: int, h: int, i: int, *, seed: int = 0, **kw) -> tuple[FusedMoeExperts, Qwen3MoeExperts]:
    """A fused module quantized from random weights and an eager module holding its de-quantized weights."""
    torch.manual_seed(seed)
    cfg = Qwen3MoeConfig(hidden_size=h, moe_intermediate_size=i, num_experts=e)
    cfg._experts_implementation = "eager"
    eager = Qwen3MoeExperts(cfg)
    with torch.no_grad():
        eager.gate_up_proj.normal_(0, h**-0.5)
        eager.down_proj.normal_(0, i**-0.5)
    fused = FusedMoeExperts.from_experts(eager, **kw)
    gu, dn = fused.dequantized()
    with torch.no_grad():
        eager.gate_up_proj.copy_(gu)
        eager.down_proj.copy_(dn)
    eager.requires_grad_(False)  # frozen base weights, as in QLoRA
    return fused, eager


def routing(t: int, e: int, k: int, *, seed: int = 1, skip: tuple[int, ...] = ()) -> tuple[torch.Tensor, ...]:
    """Random softmax-top-k routing (T, k) renormalised; experts in `skip` receive no token."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(t, e, generator=g)
    logits[:, list(skip)] = -1e9
    probs = logits.softmax(-1)
    w, idx = probs.topk(k, dim=-1)
    return idx, w / w.sum(-1, keepdim=True)


def assert_matches_eager(
    fused: FusedMoeExperts, eager: Qwen3MoeExperts, x, idx, w, tol: float = 1e-5
) -> None:
    """Outputs and the gradients of x and of the routing weights equal eager's within `tol`."""
    xf, wf = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    xe, we = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    out, ref = fused(xf, idx, wf), eager(xe, idx, we)
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    dy = torch.randn_like(out)
    out.backward(dy)
    ref.backward(dy)
    torch.testing.assert_close(xf.grad, xe.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(wf.grad, we.grad, rtol=tol, atol=tol)
