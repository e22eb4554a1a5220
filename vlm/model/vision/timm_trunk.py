"""`open_clip_timm`: open_clip towers whose image trunk is a timm model (SigLIP / SigLIP2)."""

from __future__ import annotations

from typing import Any

from torch import nn

from vlm.model.vision.base import VisionTower
from vlm.model.vision.registry import register


@register("open_clip_timm")
class TimmTrunk(VisionTower):
    @staticmethod
    def geometry(visual: nn.Module) -> dict[str, Any]:
        trunk = visual.trunk  # open_clip's TimmModel wraps a timm VisionTransformer
        return {
            "image_size": tuple(visual.image_size),
            "grid": tuple(trunk.patch_embed.grid_size),
            "width": trunk.embed_dim,
            "layers": len(trunk.blocks),
            "prefix_tokens": trunk.num_prefix_tokens,
            "mlp_hidden": next(
                m for m in trunk.blocks[0].mlp.modules() if isinstance(m, nn.Linear)
            ).out_features,
        }
