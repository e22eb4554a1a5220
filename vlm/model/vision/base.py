"""The vision-tower interface: uint8 frames in, one block's patch tokens out, plus the facts others need.

Training, the feature cache, the planner and the exporter ask a tower for `image_size`, `grid` (patches
per side), `width` (Dv), `cache_key` (changes whenever the features would) and `activation_bytes`; the
implementations (one file each, registered by `vision.type`) only say how to read those off their
module and how to run it. Weights come from an open_clip pretrained tag, a local safetensors file, or a
seeded random init (`pretrained: null`, architecture only: no download).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from vlm.config.schema import VisionConfig


class VisionTower(nn.Module):
    """(B, T, H, W, 3) uint8 frames → (B, T, P, Dv) patch tokens of block `feature_layer`."""

    def __init__(self, visual: nn.Module, cfg: VisionConfig) -> None:
        super().__init__()
        self.visual = visual
        self.cfg = cfg
        self.register_buffer("mean", torch.tensor(cfg.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.std).view(1, 3, 1, 1), persistent=False)
        g = self.geometry(visual)
        self.image_size: tuple[int, int] = g["image_size"]
        self.grid: tuple[int, int] = g["grid"]
        self.width: int = g["width"]  # Dv
        self.num_layers: int = g["layers"]
        self.prefix_tokens: int = g["prefix_tokens"]  # class / register tokens besides the patches
        self.mlp_hidden: int = g["mlp_hidden"]
        self.layer = cfg.feature_layer % self.num_layers  # -2: LLaVA's penultimate layer; -1: the last
        self.frozen = cfg.freeze
        self.cache_key = ""  # set by the builder once the weights are in place (`fingerprint`)
        if self.frozen:
            self.requires_grad_(False)
            self.eval()

    # -- what an implementation provides ----------------------------------------------------------
    @staticmethod
    def geometry(visual: nn.Module) -> dict[str, Any]:
        """image_size, grid, width, layers, prefix_tokens, mlp_hidden of the wrapped module."""
        raise NotImplementedError

    # -- the interface ----------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return next(self.visual.parameters()).dtype

    def train(self, mode: bool = True) -> VisionTower:
        return super().train(mode and not self.frozen)  # a frozen tower stays in eval mode

    def fingerprint(self) -> str:
        """Key of the features this tower makes: its config and its weights, whatever their origin (a tag,
        a file, a seed, or a checkpoint that fine-tuned them). The weights are sampled, not read whole:
        up to 4,096 evenly spaced values per tensor (~0.1 s at ViT-L)."""
        src: dict[str, Any] = {k: v for k, v in asdict(self.cfg).items() if k not in ("freeze", "weights")}
        src["layer"] = self.layer
        h = hashlib.sha256()
        for name, p in sorted(self.visual.state_dict().items()):
            flat = p.detach().float().flatten().cpu()
            step = max(1, flat.numel() // 4096)
            h.update(f"{name}{tuple(p.shape)}".encode() + flat[::step].numpy().tobytes())
        src["weights"] = h.hexdigest()[:16]
        return hashlib.sha256(json.dumps(src, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def activation_bytes(self, frames: int, compute_bytes: int) -> int:
        """Peak bytes of an inference pass over `frames` frames (the planner's vision term): the largest
        block's working set per token (residual + LN out + max(qkv + attention out, 2 MLP widths)) plus
        the frames as uint8, normalised fp32 and cast."""
        w, b = self.width, compute_bytes
        seq = self.grid[0] * self.grid[1] + self.prefix_tokens
        per_token = b * (2 * w + max(4 * w, 2 * self.mlp_hidden))
        pixels = 3 * self.image_size[0] * self.image_size[1] * (1 + 4 + b)
        return frames * (seq * per_token + pixels)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        b, t, h, w, _ = frames.shape
        if (h, w) != self.image_size:
            raise ValueError(
                f"frames are {h}x{w}, the vision tower expects {self.image_size[0]}x{self.image_size[1]}"
            )
        x = frames.reshape(b * t, h, w, 3).permute(0, 3, 1, 2)  # (BT, 3, H, W)
        x = ((x.to(self.mean.dtype) / 255.0 - self.mean) / self.std).to(self.dtype)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            out = self.visual.forward_intermediates(
                x, indices=[self.layer], stop_early=True, intermediates_only=True, output_fmt="NLC"
            )["image_intermediates"][0]  # (BT, P, Dv): patch tokens only, no class/register tokens
        return out.reshape(b, t, out.shape[1], out.shape[2])
