"""`mlp2x_gelu`: LLaVA-1.5's projector, Linear-GELU-Linear on each frame's pooled patch tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from projector.base import MISSING, Projector, ProjectorConfig
from projector.registry import register


@dataclass
class MLPConfig(ProjectorConfig):
    hidden_mult: int = MISSING  # hidden width = decoder hidden x hidden_mult


@register("mlp2x_gelu", MLPConfig)
class MLPProjector(Projector):
    def __init__(
        self, cfg: MLPConfig, in_dim: int, out_dim: int, grid: tuple[int, int], embed_scale: float
    ) -> None:
        super().__init__(cfg, in_dim, out_dim, grid, embed_scale)
        self.hidden = out_dim * int(cfg.hidden_mult)
        self.fc1 = nn.Linear(in_dim, self.hidden)
        self.fc2 = nn.Linear(self.hidden, out_dim)

    def project(self, prepared: torch.Tensor) -> torch.Tensor:
        self._check_prepared(prepared)
        x = prepared.to(self.fc1.weight.dtype)  # (B, T, K, Dv)
        return self._finish(self.fc2(F.gelu(self.fc1(x))))  # (B, T·K, D)

    def activation_bytes(self, batch: int, frames: int, compute_bytes: int, prepared: bool) -> int:
        b, (gh, gw) = compute_bytes, self.grid
        tokens = batch * frames * self.tokens_per_frame
        feats = batch * frames * (self.tokens_per_frame if prepared else gh * gw) * self.in_dim * b
        # pooled fp32 + its cast, fc1 out and GELU out, fc2 out + LayerNorm (fp32 stats, output, gain)
        return feats + tokens * (4 * self.in_dim + b * self.in_dim + 2 * b * self.hidden + 12 * self.out_dim)
