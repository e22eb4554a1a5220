"""`mlp2x_gelu`: LLaVA-1.5's projector with per-frame 2D pooling and a learned frame position.

Each frame's patch grid is average-pooled to pool x pool tokens (keeping the spatial layout, so
"where" survives), mapped by Linear-GELU-Linear into the decoder's width, and offset by a learned
embedding of the frame's index. A LayerNorm plus a learned gain initialised to the decoder's token
embedding scale makes the visual tokens start at the magnitude the decoder is used to; without it a
fresh projector's outputs are orders of magnitude off and the decoder ignores them for hundreds of steps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MLPProjector(nn.Module):
    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        grid: tuple[int, int],
        pool: int = 4,
        max_frames: int = 64,
        hidden_mult: int = 1,
        embed_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.grid = grid
        self.pool = min(pool, grid[0], grid[1])
        self.tokens_per_frame = self.pool * self.pool
        self.max_frames = max_frames
        hidden = out_dim * hidden_mult
        self.fc1 = nn.Linear(in_dim, hidden)
        self.fc2 = nn.Linear(hidden, out_dim)
        self.norm = nn.LayerNorm(out_dim, elementwise_affine=False)
        # RMS of the decoder's token embeddings: LayerNorm output has unit RMS, times this matches it.
        self.gain = nn.Parameter(torch.full((out_dim,), float(embed_scale)))
        self.frame_pos = nn.Parameter(torch.zeros(max_frames, out_dim))
        nn.init.normal_(self.frame_pos, std=0.02 * embed_scale)

    def num_tokens(self, num_frames: int) -> int:
        return num_frames * self.tokens_per_frame

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """(B, T, P, Dv) patch tokens → (B, T*K, D) visual tokens, K = pool^2."""
        b, t, p, dv = feats.shape
        gh, gw = self.grid
        if p != gh * gw:
            raise ValueError(f"projector expects {gh}x{gw}={gh * gw} patches per frame, got {p}")
        if t > self.max_frames:
            raise ValueError(f"{t} frames exceed projector.max_frames={self.max_frames}")
        x = feats.reshape(b * t, gh, gw, dv).permute(0, 3, 1, 2)  # (BT, Dv, gh, gw)
        x = F.adaptive_avg_pool2d(x, self.pool)  # (BT, Dv, pool, pool), row-major keeps layout
        x = x.flatten(2).transpose(1, 2).to(self.fc1.weight.dtype)  # (BT, K, Dv)
        x = self.fc2(F.gelu(self.fc1(x)))  # (BT, K, D)
        x = self.norm(x) * self.gain
        x = x.reshape(b, t, self.tokens_per_frame, -1) + self.frame_pos[:t, None, :]  # (B, T, K, D)
        return x.reshape(b, t * self.tokens_per_frame, -1)
