"""The frozen open_clip vision encoder: frames in, per-frame patch tokens out.

A config names an open_clip architecture and pretrained tag (ViT-L-14/openai, SigLIP2, ...) or, for
tests and the CPU demo, a tiny custom CLIP built with random seeded weights. Either way the encoder is
open_clip's own `VisionTransformer`; we take its patch tokens (not only the pooled embedding).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import open_clip
import torch
from safetensors.torch import load_file
from torch import nn

from vlm.decoder import as_dict


def build_clip(vision_cfg: Mapping[str, Any]) -> nn.Module:
    """The whole open_clip CLIP model (text tower included, for optional contrastive warm-up)."""
    cfg = as_dict(vision_cfg)
    if cfg.get("arch"):
        model = open_clip.create_model(
            cfg["arch"], pretrained=None if cfg.get("weights") else cfg.get("pretrained")
        )
    else:
        torch.manual_seed(cfg.get("init_seed", 0))
        mc = cfg["model_cfg"]
        model = open_clip.CLIP(
            embed_dim=mc["embed_dim"], vision_cfg=mc["vision_cfg"], text_cfg=mc["text_cfg"]
        )
    if cfg.get("weights"):  # a local safetensors state dict of the whole CLIP model (e.g. a warm-up)
        model.load_state_dict(load_file(cfg["weights"]), strict=True)
    return model


class VisionEncoder(nn.Module):
    """open_clip ViT → patch tokens per frame. Frozen unless `freeze=False` (demo warm-up)."""

    def __init__(
        self,
        visual: nn.Module,
        mean: list[float],
        std: list[float],
        cache_key: str,
        feature_layer: int = -1,
        freeze: bool = True,
    ) -> None:
        super().__init__()
        self.visual = visual
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.cache_key = cache_key  # names the features for the feature cache
        n_layers = len(visual.transformer.resblocks)
        self.layer = feature_layer % n_layers  # -2: LLaVA's penultimate layer; -1: the last
        size = visual.image_size if isinstance(visual.image_size, tuple) else (visual.image_size,) * 2
        patch = visual.patch_size if isinstance(visual.patch_size, tuple) else (visual.patch_size,) * 2
        self.image_size = size
        self.grid = (size[0] // patch[0], size[1] // patch[1])
        self.out_dim: int = visual.transformer.width
        self.frozen = freeze
        if freeze:
            self.requires_grad_(False)
            self.eval()

    def train(self, mode: bool = True) -> VisionEncoder:
        return super().train(mode and not self.frozen)  # a frozen encoder stays in eval mode

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, T, H, W, 3) uint8 → (B, T, P, Dv) patch tokens, P = grid_h * grid_w."""
        b, t, h, w, _ = frames.shape
        if (h, w) != self.image_size:
            raise ValueError(
                f"frames are {h}x{w}, the encoder expects {self.image_size[0]}x{self.image_size[1]}"
            )
        x = frames.reshape(b * t, h, w, 3).permute(0, 3, 1, 2)  # (BT, 3, H, W)
        dtype = next(self.visual.parameters()).dtype
        x = ((x.to(self.mean.dtype) / 255.0 - self.mean) / self.std).to(dtype)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            out = self.visual.forward_intermediates(
                x, indices=[self.layer], stop_early=True, intermediates_only=True, output_fmt="NLC"
            )["image_intermediates"][0]  # (BT, P, Dv)
        return out.reshape(b, t, out.shape[1], out.shape[2])


def build_vision(vision_cfg: Mapping[str, Any], clip: nn.Module | None = None) -> VisionEncoder:
    """The encoder a vision config describes; pass `clip` to reuse an already built (warmed) model."""
    cfg = as_dict(vision_cfg)
    clip = clip if clip is not None else build_clip(cfg)
    key_src = {
        k: cfg.get(k) for k in ("arch", "pretrained", "image_size", "model_cfg", "init_seed", "weights")
    }
    key_src["feature_layer"] = cfg.get("feature_layer", -1)
    if not cfg.get("arch") or cfg.get("weights"):  # local weights: the key must change when they do
        key_src["weights"] = hashlib.sha256(
            b"".join(p.detach().float().numpy().tobytes()[:4096] for p in clip.visual.parameters())
        ).hexdigest()[:16]
    key = hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()[:16]
    return VisionEncoder(
        clip.visual,
        mean=list(cfg["mean"]),
        std=list(cfg["std"]),
        cache_key=key,
        feature_layer=cfg.get("feature_layer", -1),
        freeze=cfg.get("freeze", True),
    )
