"""Projectors from vision patch tokens to decoder embeddings; `build_projector` picks one by config."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from projector.mlp import MLPProjector

__all__ = ["MLPProjector", "build_projector"]


def build_projector(
    cfg: Mapping[str, Any], in_dim: int, out_dim: int, grid: tuple[int, int], embed_scale: float = 1.0
) -> MLPProjector:
    if cfg["type"] != "mlp2x_gelu":
        raise ValueError(f"projector.type={cfg['type']!r}: only 'mlp2x_gelu' is implemented")
    return MLPProjector(
        in_dim,
        out_dim,
        grid=tuple(grid),
        pool=int(cfg.get("pool", 4)),
        max_frames=int(cfg.get("max_frames", 64)),
        hidden_mult=int(cfg.get("hidden_mult", 1)),
        embed_scale=embed_scale,
    )
