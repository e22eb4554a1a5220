"""The VLM on tensors: vision tower → projector → Qwen3 decoder (no text, no Lightning, no Hydra).

Inputs are token ids and masks made by the processor, with one <|video_pad|> (id 151656) per visual
token; `embed` overwrites those rows with the projector's output. The loss applies the 151,936-wide
lm_head only at labelled positions (caption + <|im_end|>), which is most of a step's memory otherwise.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlm.model.processor import IGNORE
from vlm.model.tokenizer import VIDEO_PAD_ID


class VLM(nn.Module):
    def __init__(self, vision: nn.Module | None, projector: nn.Module, decoder: nn.Module) -> None:
        super().__init__()
        self.vision = vision  # None only for a model that is fed features (e.g. the planner's meta build)
        self.projector = projector
        self.decoder = decoder  # a transformers causal LM, possibly peft-wrapped and 4-bit

    # -- decoder parts, whether or not peft wraps the model ----------------------------------------
    @property
    def causal_lm(self) -> nn.Module:
        d = self.decoder
        return d.get_base_model() if hasattr(d, "get_base_model") else d

    @property
    def backbone(self) -> nn.Module:
        return self.causal_lm.model

    # -- vision ------------------------------------------------------------------------------------
    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, T, H, W, 3) uint8 → (B, T, P, Dv) patch features (no grad unless the tower trains)."""
        if self.vision is None:
            raise RuntimeError("this VLM has no vision tower; feed it features")
        return self.vision(frames)

    def visual_tokens(self, feats: torch.Tensor, prepared: bool = False) -> torch.Tensor:
        """(B, T, P, Dv) features (or (B, T, K, Dv) already prepared, from the cache) → (B, N, D)."""
        return self.projector(feats.to(self.projector.dtype), prepared=prepared)

    def embed(self, input_ids: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        """Token embeddings with the <|video_pad|> rows replaced by visual tokens: (B, L, D)."""
        emb = self.backbone.get_input_embeddings()(input_ids)  # (B, L, D)
        is_pad = input_ids == VIDEO_PAD_ID
        counts = is_pad.sum(1)
        if bool((counts != visual.shape[1]).any()):
            bad = int(counts[counts != visual.shape[1]][0])
            raise ValueError(
                f"prompt has {bad} <|video_pad|> placeholders but the video gave {visual.shape[1]} visual tokens"
            )
        return emb.masked_scatter(is_pad.unsqueeze(-1), visual.to(emb.dtype))

    # -- training ----------------------------------------------------------------------------------
    def loss_sum(
        self,
        feats: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        prepared: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed next-token cross-entropy, number of labelled tokens); logits only where labels are set.
        The sum, not the mean, so a trainer can divide by the token count of all ranks together."""
        visual = self.visual_tokens(feats, prepared)  # (B, N, D)
        dev = visual.device
        ids, mask, labels = input_ids.to(dev), attention_mask.to(dev), labels.to(dev)
        hidden = self.backbone(inputs_embeds=self.embed(ids, visual), attention_mask=mask).last_hidden_state
        target = labels[:, 1:]  # position t predicts token t+1
        keep = target != IGNORE
        h = hidden[:, :-1][keep]  # (N_labels, D): the only rows that reach the 151,936-wide head
        logits = self.causal_lm.lm_head(h).float()  # (N_labels, V)
        return F.cross_entropy(logits, target[keep], reduction="sum"), keep.sum()

    def loss(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Mean next-token cross-entropy over the labelled tokens of this batch (see `loss_sum`)."""
        total, n = self.loss_sum(*args, **kwargs)
        return total / n

    # -- generation --------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        feats: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        stop_ids: list[int],
        pad_id: int,
        prepared: bool = False,
        max_new_tokens: int = 64,
        num_beams: int = 1,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
    ) -> torch.Tensor:
        """New token ids (B, new) after left-padded prompts; KV cache; stops at any of `stop_ids`."""
        visual = self.visual_tokens(feats, prepared)  # (B, N, D)
        dev = visual.device
        sampling: dict[str, Any] = {"do_sample": do_sample}
        if do_sample:
            sampling.update(temperature=temperature, top_p=top_p)
        return self.causal_lm.generate(
            inputs_embeds=self.embed(input_ids.to(dev), visual),
            attention_mask=attention_mask.to(dev),
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
            repetition_penalty=repetition_penalty,
            eos_token_id=list(stop_ids),
            pad_token_id=pad_id,
            use_cache=True,
            **sampling,
        )  # with inputs_embeds only the new tokens come back
