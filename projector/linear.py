"""`linear`: LLaVA-1's projector, one Linear on each frame's pooled patch tokens."""

from __future__ import annotations

import torch
from torch import nn

from projector.base import Projector, ProjectorConfig
from projector.registry import register


@register("linear", ProjectorConfig)
class LinearProjector(Projector):
    def __init__(
        self, cfg: ProjectorConfig, in_dim: int, out_dim: int, grid: tuple[int, int], embed_scale: float
    ) -> None:
        super().__init__(cfg, in_dim, out_dim, grid, embed_scale)
        self.fc = nn.Linear(in_dim, out_dim)

    def project(self, prepared: torch.Tensor) -> torch.Tensor:
        self._check_prepared(prepared)
        return self._finish(self.fc(prepared.to(self.fc.weight.dtype)))  # (B, T·K, D)

    def activation_bytes(self, batch: int, frames: int, compute_bytes: int, prepared: bool) -> int:
        b, (gh, gw) = compute_bytes, self.grid
        tokens = batch * frames * self.tokens_per_frame
        feats = batch * frames * (self.tokens_per_frame if prepared else gh * gw) * self.in_dim * b
        # pooled fp32 + its cast (fc's saved input), fc out + LayerNorm (fp32 stats, output, gain)
        return feats + tokens * (4 * self.in_dim + b * self.in_dim + b * self.out_dim + 12 * self.out_dim)
