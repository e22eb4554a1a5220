"""The projector interface: what training, the feature cache, the planner and the exporter may ask.

A projector maps the patch tokens of T frames, (B, T, P, Dv), to N visual tokens in the decoder's width,
(B, N, D). It works in two steps so the frozen part can be cached: `prepare` is parameter-free (e.g.
per-frame pooling; `cache_spec` says what it does, so the feature cache can store its output and key
on it) and `project` holds every trained weight. Every projector also ends the same way (`_finish`): a
LayerNorm and a gain initialised to the decoder's token-embedding RMS, so visual tokens start at the
scale the decoder reads, plus a learned embedding of the frame index, so frame order survives.
Nothing outside `projector/` reads a projector's attributes; they ask through these methods.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

MISSING: Any = "???"


@dataclass
class ProjectorConfig:
    type: str = MISSING  # the registry name (projector/<type>.py)
    pool: int = MISSING  # each frame's patch grid is average-pooled to pool x pool tokens
    max_frames: int = MISSING  # size of the learned frame-position table


class Projector(nn.Module):
    def __init__(
        self, cfg: ProjectorConfig, in_dim: int, out_dim: int, grid: tuple[int, int], embed_scale: float
    ) -> None:
        super().__init__()
        self.cfg, self.in_dim, self.out_dim, self.grid = cfg, in_dim, out_dim, tuple(grid)
        self.pool = min(int(cfg.pool), grid[0], grid[1])
        self.tokens_per_frame = self.pool * self.pool
        self.max_frames = int(cfg.max_frames)
        self.norm = nn.LayerNorm(out_dim, elementwise_affine=False)
        # LayerNorm output has unit RMS; times the decoder's embedding RMS it matches the token embeddings.
        self.gain = nn.Parameter(torch.full((out_dim,), float(embed_scale)))
        self.frame_pos = nn.Parameter(torch.zeros(self.max_frames, out_dim))
        nn.init.normal_(self.frame_pos, std=0.02 * embed_scale)

    # -- what others may ask -------------------------------------------------------------------------
    def num_tokens(self, num_frames: int) -> int:
        """Visual tokens (<|video_pad|> placeholders) for a clip of `num_frames` frames."""
        return num_frames * self.tokens_per_frame

    def cache_spec(self) -> dict[str, Any]:
        """What `prepare` does to the patch tokens: the feature cache stores its output under this key."""
        return {"prepare": "avg_pool2d", "grid": list(self.grid), "pool": self.pool}

    def metadata(self) -> dict[str, Any]:
        """What an export records to rebuild this projector (with its weights file)."""
        return {
            "config": asdict(self.cfg),
            "in_dim": self.in_dim,
            "out_dim": self.out_dim,
            "grid": list(self.grid),
        }

    @property
    def dtype(self) -> torch.dtype:
        return self.gain.dtype

    def activation_bytes(self, batch: int, frames: int, compute_bytes: int, prepared: bool) -> int:
        """Bytes autograd keeps for one training step (the planner's projector term)."""
        raise NotImplementedError

    # -- compute -------------------------------------------------------------------------------------
    def prepare(self, feats: torch.Tensor) -> torch.Tensor:
        """(B, T, P, Dv) patch tokens → (B, T, K, Dv) pooled tokens, K = pool²; no parameters."""
        b, t, p, dv = feats.shape
        gh, gw = self.grid
        if p != gh * gw:
            raise ValueError(f"projector expects {gh}x{gw}={gh * gw} patches per frame, got {p}")
        x = feats.reshape(b * t, gh, gw, dv).permute(0, 3, 1, 2)  # (BT, Dv, gh, gw)
        x = F.adaptive_avg_pool2d(x, self.pool)  # (BT, Dv, pool, pool); row-major keeps where things are
        return x.flatten(2).transpose(1, 2).reshape(b, t, self.tokens_per_frame, dv)

    def project(self, prepared: torch.Tensor) -> torch.Tensor:
        """(B, T, K, Dv) → (B, T·K, D)."""
        raise NotImplementedError

    def forward(self, feats: torch.Tensor, prepared: bool = False) -> torch.Tensor:
        """(B, T, P, Dv) patch tokens (or (B, T, K, Dv) when `prepared`) → (B, T·K, D) visual tokens."""
        return self.project(feats if prepared else self.prepare(feats))

    def _check_prepared(self, x: torch.Tensor) -> None:
        if x.shape[2] != self.tokens_per_frame:
            raise ValueError(f"expected {self.tokens_per_frame} pooled tokens per frame, got {x.shape[2]}")
        if x.shape[1] > self.max_frames:
            raise ValueError(f"{x.shape[1]} frames exceed projector.max_frames={self.max_frames}")

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, K, D) projected tokens → scaled, frame-positioned (B, T·K, D)."""
        b, t = x.shape[:2]
        x = self.norm(x) * self.gain + self.frame_pos[:t, None, :]
        return x.reshape(b, t * self.tokens_per_frame, -1)
