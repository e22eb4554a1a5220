"""Grouped matrix products over rows sorted by expert, without a Python loop over experts.

`grouped_mm(a, b, offs)` multiplies the rows of `a (P, K)` that belong to expert e (rows
`offs[e-1]:offs[e]`) by `b[e] (K, N)`. It uses `torch._grouped_mm` where that kernel accepts the
operands (CPU with 16-byte aligned strides; CUDA with bf16) and otherwise scatters the rows into a
capacity-padded `(E, C, K)` batch and calls `bmm` (one host sync for C). bench/moe.py times both
inside the PyTorch path on the 2-core CPU: single-threaded `_grouped_mm` was 1.2-1.5x faster (bf16 and
fp32); on both cores it was 1.3-1.4x faster in fp32, but in bf16 padded `bmm` was the faster one in
the last run (51.9 vs 54.2 ms forward, 109.4 vs 123.2 ms forward+backward). Padded `bmm` also wastes FLOPs when routing is unbalanced, so `_grouped_mm` is
the default.

`GroupedMM` makes the product differentiable in both operands (the LoRA factors need weight
gradients); torch's own autograd formula for `_grouped_mm` is not usable on CPU in torch 2.13.
"""

from __future__ import annotations

import torch


def _aligned(t: torch.Tensor) -> bool:
    size = t.element_size()
    return t.data_ptr() % 16 == 0 and all(
        (st * size) % 16 == 0 for st, n in zip(t.stride(), t.shape, strict=True) if st != 1 and n > 1
    )


# "native": torch._grouped_mm where it accepts the operands; "bmm": always the padded-bmm fallback
# (bench/moe.py times both).
PREFER = "native"


def _native_ok(a: torch.Tensor, b: torch.Tensor) -> bool:
    if PREFER != "native" or not hasattr(torch, "_grouped_mm") or a.dtype != b.dtype:
        return False
    if a.device.type == "cuda" and a.dtype != torch.bfloat16:
        return False
    return _aligned(a) and _aligned(b)


def _capacity_layout(offs: torch.Tensor, num_rows: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Rows -> slots of an (E, C) grid: (valid rows (R,), their flat slot e*C + i (R,), C)."""
    counts = torch.diff(offs.long(), prepend=offs.new_zeros(1).long())  # (E,)
    cap = max(int(counts.max()), 1)  # the one host sync of the fallback
    rows = torch.arange(num_rows, device=offs.device)
    expert = torch.searchsorted(offs.long(), rows, right=True)  # (P,) E past the last run
    valid = rows[expert < offs.numel()]
    expert = expert[: valid.numel()]
    slot = expert * cap + (valid - (offs.long() - counts)[expert])
    return valid, slot, cap


def _fallback_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    e, _, n = b.shape
    valid, slot, cap = _capacity_layout(offs, a.shape[0])
    buf = a.new_zeros(e * cap, a.shape[1])
    buf[slot] = a[valid]
    out = a.new_zeros(a.shape[0], n)
    out[valid] = torch.bmm(buf.view(e, cap, -1), b).view(e * cap, n)[slot]
    return out


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """(P, K) x (E, K, N) grouped by `offs (E,)` int32 run ends -> (P, N); rows past offs[-1] give 0."""
    if _native_ok(a, b):
        out = torch._grouped_mm(a, b, offs=offs)
        # _grouped_mm leaves rows past the last run uninitialized; zero them (their gradient would
        # otherwise leak garbage into the gathered inputs). Without a sync on CUDA: a masked fill.
        if out.device.type == "cpu":
            out[int(offs[-1]) :].zero_()
        else:
            out.masked_fill_(torch.arange(out.shape[0], device=out.device)[:, None] >= offs[-1], 0)
        return out
    return _fallback_mm(a, b, offs)


def grouped_weight_grad(a: torch.Tensor, dy: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Per-expert a_e^T @ dy_e: (P, K), (P, N) -> (E, K, N)."""
    at = a.t()  # (K, P) view: the layout _grouped_mm wants for a reduction along the grouped dim
    if _native_ok(at, dy):
        return torch._grouped_mm(at, dy, offs=offs)
    e = offs.numel()
    valid, slot, cap = _capacity_layout(offs, a.shape[0])
    ba = a.new_zeros(e * cap, a.shape[1])
    bd = dy.new_zeros(e * cap, dy.shape[1])
    ba[slot], bd[slot] = a[valid], dy[valid]
    return torch.bmm(ba.view(e, cap, -1).transpose(1, 2), bd.view(e, cap, -1))


class GroupedMM(torch.autograd.Function):
    """Differentiable `grouped_mm`: gradients for both the rows and the per-expert matrices."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a, b, offs)
        return grouped_mm(a, b, offs)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        a, b, offs = ctx.saved_tensors
        dy = dy.contiguous()
        da = grouped_mm(dy, b.transpose(1, 2), offs) if ctx.needs_input_grad[0] else None
        db = grouped_weight_grad(a, dy, offs) if ctx.needs_input_grad[1] else None
        return da, db, None
