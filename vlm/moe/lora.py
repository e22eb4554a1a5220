"""Per-expert LoRA on the frozen NF4 experts, as low-rank grouped products (B·A is never formed).

For expert e, gate_up gets `x A_gu[e]^T B_gu[e]^T * scale` added before SiLU·up and down gets
`h A_d[e]^T B_d[e]^T * scale` added before the routing weight, with A `[E, r, in]` and B `[E, out, r]`
(peft's layout per expert: A Kaiming-uniform, B zero, so a fresh adapter changes nothing; scale =
alpha / r as in peft). Each term is two grouped products over the rows of the routing plan (rank r in
between), differentiable through `GroupedMM`, so the experts' autograd Functions only see an additive
input. Either part can be left out (`parts`). There is no dropout: like peft's `ParamWrapper` for 3D
expert parameters, x cannot be factored out of B·A·dropout(x) once the rows are grouped per expert.

The factors are float32 parameters (they train with AdamW); each call casts them to the rows' dtype.
`vlm.moe.adapter_format` converts them to and from peft's and vLLM's saved layouts.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vlm.moe.grouped import GroupedMM
from vlm.moe.routing import RoutingPlan

PARTS = ("gate_up_proj", "down_proj")  # transformers' names of the two expert tensors, in this order


class ExpertLoRA(nn.Module):
    """LoRA factors for every expert of one layer (gate_up and/or down)."""

    def __init__(
        self,
        num_experts: int,
        hidden: int,
        intermediate: int,
        r: int,
        alpha: float | None = None,
        parts: tuple[str, ...] = PARTS,
    ):
        super().__init__()
        if r <= 0:
            raise ValueError(f"ExpertLoRA needs rank r > 0, got {r}")
        unknown = set(parts) - set(PARTS)
        if unknown or not parts:
            raise ValueError(f"ExpertLoRA parts must be a non-empty subset of {PARTS}, got {parts}")
        self.r, self.alpha = r, float(alpha if alpha is not None else r)
        self.scale = self.alpha / r  # default alpha = r: scale 1
        self.parts = tuple(p for p in PARTS if p in parts)
        e, h, i = num_experts, hidden, intermediate
        self.shapes = {"gate_up_proj": (h, 2 * i), "down_proj": (i, h)}  # (in, out) per expert
        f32 = torch.float32
        if "gate_up_proj" in self.parts:
            self.gate_up_A = nn.Parameter(torch.empty(e, r, h, dtype=f32))
            self.gate_up_B = nn.Parameter(torch.zeros(e, 2 * i, r, dtype=f32))
        if "down_proj" in self.parts:
            self.down_A = nn.Parameter(torch.empty(e, r, i, dtype=f32))
            self.down_B = nn.Parameter(torch.zeros(e, h, r, dtype=f32))
        self.reset_parameters()

    def factors(self, part: str) -> tuple[nn.Parameter, nn.Parameter]:
        """(A (E, r, in), B (E, out, r)) of `gate_up_proj` or `down_proj`."""
        short = "gate_up" if part == "gate_up_proj" else "down"
        return getattr(self, f"{short}_A"), getattr(self, f"{short}_B")

    def reset_parameters(self) -> None:
        # peft's init per expert: kaiming_uniform_(a=sqrt(5)) on A (bound 1/sqrt(fan_in)), zeros on B.
        for part in self.parts:
            a, b = self.factors(part)
            nn.init.uniform_(a, -1 / math.sqrt(a.shape[-1]), 1 / math.sqrt(a.shape[-1]))
            nn.init.zeros_(b)

    def _low_rank(self, rows: torch.Tensor, a: torch.Tensor, b: torch.Tensor, plan: RoutingPlan):
        a, b = a.to(rows.dtype), b.to(rows.dtype)  # no-op in float32; a per-call copy under bf16
        mid = GroupedMM.apply(rows, a.transpose(1, 2), plan.offsets)  # (P, r)
        return GroupedMM.apply(mid, b.transpose(1, 2), plan.offsets) * self.scale  # (P, out)

    def gate_up(self, x: torch.Tensor, plan: RoutingPlan) -> torch.Tensor | None:
        """(T, H) tokens -> (P, 2I) additive pre-activation of each row, or None without that part."""
        if "gate_up_proj" not in self.parts:
            return None
        return self._low_rank(plan.gather_tokens(x), self.gate_up_A, self.gate_up_B, plan)

    def down(self, h: torch.Tensor, plan: RoutingPlan) -> torch.Tensor | None:
        """(P, I) SiLU·up rows -> (P, H) additive expert output (before the routing weight), or None."""
        if "down_proj" not in self.parts:
            return None
        return self._low_rank(h, self.down_A, self.down_B, plan)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}, parts={self.parts}"
