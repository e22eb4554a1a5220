"""Per-expert LoRA on the frozen NF4 experts, as low-rank grouped products (B·A is never formed).

For expert e, gate_up gets `x A_gu[e]^T B_gu[e]^T * scale` added before SiLU·up and down gets
`h A_d[e]^T B_d[e]^T * scale` added before the routing weight, with A `[E, r, in]` and B `[E, out, r]`
(peft's layout per expert: A Kaiming-uniform, B zero, so a fresh adapter changes nothing). Each term is
two grouped products over the rows of the routing plan (rank r in between), differentiable through
`GroupedMM`, so the experts' autograd Functions only see an additive input.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vlm.moe.grouped import GroupedMM
from vlm.moe.routing import RoutingPlan


class ExpertLoRA(nn.Module):
    """LoRA factors for every expert of one layer (gate_up and down)."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, r: int, alpha: float | None = None):
        super().__init__()
        if r <= 0:
            raise ValueError(f"ExpertLoRA needs rank r > 0, got {r}")
        self.r, self.scale = r, (alpha if alpha is not None else r) / r  # default scale 1
        e, h, i = num_experts, hidden, intermediate
        self.gate_up_A = nn.Parameter(torch.empty(e, r, h))
        self.gate_up_B = nn.Parameter(torch.zeros(e, 2 * i, r))
        self.down_A = nn.Parameter(torch.empty(e, r, i))
        self.down_B = nn.Parameter(torch.zeros(e, h, r))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # peft's init per expert: kaiming_uniform_(a=sqrt(5)) on A (bound 1/sqrt(fan_in)), zeros on B.
        for a in (self.gate_up_A, self.down_A):
            nn.init.uniform_(a, -1 / math.sqrt(a.shape[-1]), 1 / math.sqrt(a.shape[-1]))
        nn.init.zeros_(self.gate_up_B)
        nn.init.zeros_(self.down_B)

    def _low_rank(self, rows: torch.Tensor, a: torch.Tensor, b: torch.Tensor, plan: RoutingPlan):
        a, b = a.to(rows.dtype), b.to(rows.dtype)
        mid = GroupedMM.apply(rows, a.transpose(1, 2), plan.offsets)  # (P, r)
        return GroupedMM.apply(mid, b.transpose(1, 2), plan.offsets) * self.scale  # (P, out)

    def gate_up(self, xs: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
        """(P, H) gathered inputs -> (P, 2I) additive pre-activation."""
        return self._low_rank(xs, self.gate_up_A, self.gate_up_B, plan)

    def down(self, h: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
        """(P, I) SiLU·up rows -> (P, H) additive expert output (before the routing weight)."""
        return self._low_rank(h, self.down_A, self.down_B, plan)
