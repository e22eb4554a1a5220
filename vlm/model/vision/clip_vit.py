"""`open_clip`: open_clip's own `VisionTransformer` (OpenAI CLIP ViT-B/16, ViT-L/14, the tiny test tower)."""

from __future__ import annotations

from typing import Any

from torch import nn

from vlm.model.vision.base import VisionTower
from vlm.model.vision.registry import register


@register("open_clip")
class ClipViT(VisionTower):
    @staticmethod
    def geometry(visual: nn.Module) -> dict[str, Any]:
        size = visual.image_size if isinstance(visual.image_size, tuple) else (visual.image_size,) * 2
        grid = tuple(visual.grid_size)
        return {
            "image_size": tuple(size),
            "grid": grid,
            "width": visual.transformer.width,
            "layers": len(visual.transformer.resblocks),
            "prefix_tokens": visual.positional_embedding.shape[0] - grid[0] * grid[1],
            "mlp_hidden": visual.transformer.resblocks[0].mlp.c_fc.out_features,
        }
