"""The VLM: frozen vision encoder → projector → Qwen3 decoder, in plain PyTorch (no Lightning/Hydra).

Prompts are rendered by the tokenizer's own chat template (thinking off); the video sits in the user
turn as <|vision_start|> + one <|video_pad|> per visual token + <|vision_end|>, and those embeddings
are overwritten by the projector's output. Only the caption and its closing <|im_end|> carry labels,
and the 151,936-wide lm_head runs only at those positions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlm.tokenizer import IM_END, VIDEO_PAD, VIDEO_PAD_ID, VISION_END, VISION_START

IGNORE = -100
THINK_BLOCK = re.compile(r"<think>.*?(</think>|$)", re.S)


@dataclass
class Prompt:
    system: str = "당신은 비디오 캡셔닝 전문가입니다."
    user: str = "이 영상을 한국어로 자세히 묘사해 주세요."


class VLM(nn.Module):
    def __init__(
        self,
        vision: nn.Module | None,
        projector: nn.Module,
        decoder: nn.Module,
        tokenizer: Any,
        prompt: Prompt | None = None,
    ) -> None:
        super().__init__()
        self.vision = vision  # None when training from cached features
        self.projector = projector
        self.decoder = decoder  # a transformers causal LM, possibly peft-wrapped and 4-bit
        self.tokenizer = tokenizer
        self.prompt = prompt or Prompt()
        self.im_end_id: int = tokenizer.convert_tokens_to_ids(IM_END)
        self.pad_id: int = tokenizer.pad_token_id
        self._prompt_ids: dict[tuple[int, str], list[int]] = {}

    # -- decoder parts, whether or not peft wraps the model ---------------------------------------
    @property
    def causal_lm(self) -> nn.Module:
        d = self.decoder
        return d.get_base_model() if hasattr(d, "get_base_model") else d

    @property
    def backbone(self) -> nn.Module:
        return self.causal_lm.model

    # -- prompt ------------------------------------------------------------------------------------
    def prompt_ids(self, n_visual: int, user: str | None = None) -> list[int]:
        """Token ids of system + user turn (with n_visual placeholders) + assistant header."""
        user = self.prompt.user if user is None else user
        key = (n_visual, user)
        if key not in self._prompt_ids:
            video = VISION_START + VIDEO_PAD * n_visual + VISION_END
            text = self.tokenizer.apply_chat_template(
                [
                    {"role": "system", "content": self.prompt.system},
                    {"role": "user", "content": f"{video}\n{user}"},
                ],
                tokenize=False,
                add_generation_prompt=True,
                enable_thinking=False,
            )
            self._prompt_ids[key] = self.tokenizer(text, add_special_tokens=False).input_ids
        return self._prompt_ids[key]

    def training_batch(
        self, captions: list[str], n_visual: int, max_caption_tokens: int = 128
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Right-padded (input_ids, attention_mask, labels), each (B, L); labels only on caption+<|im_end|>."""
        prompt = self.prompt_ids(n_visual)
        caps = self.tokenizer(list(captions), add_special_tokens=False).input_ids
        rows = [prompt + c[:max_caption_tokens] + [self.im_end_id] for c in caps]
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        labels = torch.full_like(ids, IGNORE)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
            labels[i, len(prompt) : len(r)] = ids[i, len(prompt) : len(r)]
        return ids, mask, labels

    # -- embedding ---------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, T, H, W, 3) uint8 → (B, T, P, Dv) frozen patch features."""
        if self.vision is None:
            raise RuntimeError("this VLM was built without a vision encoder (cached features only)")
        return self.vision(frames)

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
    def loss(self, feats: torch.Tensor, captions: list[str], max_caption_tokens: int = 128) -> torch.Tensor:
        """Mean next-token cross-entropy over caption tokens; logits only where labels are set."""
        visual = self.projector(feats)  # (B, N, D)
        ids, mask, labels = self.training_batch(captions, visual.shape[1], max_caption_tokens)
        ids, mask, labels = ids.to(visual.device), mask.to(visual.device), labels.to(visual.device)
        hidden = self.backbone(inputs_embeds=self.embed(ids, visual), attention_mask=mask).last_hidden_state
        target = labels[:, 1:]  # position t predicts token t+1
        keep = target != IGNORE
        h = hidden[:, :-1][keep]  # (N_labels, D): the only rows that reach the 151,936-wide head
        logits = self.causal_lm.lm_head(h).float()  # (N_labels, V)
        return F.cross_entropy(logits, target[keep])

    # -- generation --------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        feats: torch.Tensor,
        prompts: list[str] | None = None,
        max_new_tokens: int = 64,
        num_beams: int = 1,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
    ) -> list[str]:
        """Captions for (B, T, P, Dv) features; left-padded batch, KV cache, stops at <|im_end|>."""
        visual = self.projector(feats)  # (B, N, D)
        b, n = visual.shape[:2]
        users = prompts or [self.prompt.user] * b
        rows = [self.prompt_ids(n, u) for u in users]
        length = max(len(r) for r in rows)
        ids = torch.full((b, length), self.pad_id, dtype=torch.long, device=visual.device)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):  # left padding: every row's last token is the assistant header
            ids[i, length - len(r) :] = torch.tensor(r, device=visual.device)
            mask[i, length - len(r) :] = 1
        sampling: dict[str, Any] = {"do_sample": do_sample}
        if do_sample:
            sampling.update(temperature=temperature, top_p=top_p)
        out = self.causal_lm.generate(
            inputs_embeds=self.embed(ids, visual),
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
            repetition_penalty=repetition_penalty,
            eos_token_id=[self.im_end_id, self.pad_id],
            pad_token_id=self.pad_id,
            use_cache=True,
            **sampling,
        )  # (B, new) — with inputs_embeds only the new tokens come back
        return [self.clean(self.tokenizer.decode(self._until_end(row.tolist()))) for row in out]

    def _until_end(self, ids: list[int]) -> list[int]:
        for k, t in enumerate(ids):
            if t in (self.im_end_id, self.pad_id):
                return ids[:k]
        return ids

    @staticmethod
    def clean(text: str) -> str:
        """Drop any <think>…</think> block (an unclosed one runs to the end) and outer whitespace."""
        return THINK_BLOCK.sub("", text).strip()
