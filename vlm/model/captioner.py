"""`VideoCaptioner`: a VLM and its processor together, frames (or features) in, Korean captions out.

What `vlm.load_exported(DIR)` returns, and what captioning and validation use; `meta` is the export's
vlm.json (None for a model built from a training config).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vlm.model.processor import Processor
from vlm.model.vlm import VLM


class VideoCaptioner(nn.Module):
    def __init__(self, vlm: VLM, processor: Processor, meta: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.vlm = vlm
        self.processor = processor
        self.meta = meta

    @torch.no_grad()
    def caption_features(
        self, feats: torch.Tensor, prepared: bool = False, users: list[str] | None = None, **generation: Any
    ) -> list[str]:
        """Captions for (B, T, P, Dv) features ((B, T, K, Dv) when `prepared`)."""
        text = self.processor.generation_batch(
            self.vlm.projector.num_tokens(feats.shape[1]), feats.shape[0], users
        )
        ids = self.vlm.generate(
            feats, text.input_ids, text.attention_mask, self.processor.stop_ids, self.processor.pad_id,
            prepared=prepared, **generation,
        )  # fmt: skip
        return self.processor.decode(ids)

    @torch.no_grad()
    def caption(self, frames: torch.Tensor, **generation: Any) -> list[str]:
        """Captions for (B, T, H, W, 3) uint8 frames at the tower's image size."""
        return self.caption_features(self.vlm.encode(frames), **generation)
