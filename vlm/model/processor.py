"""The processor owns all text: the Qwen3 chat prompt with its <|video_pad|> run, caption tokens and
labels, padding (right for training, left for generation), and decoding back to a clean caption.

The model never sees a string. The training collator calls `train_batch` inside DataLoader workers, the
captioner and validation call `generation_batch` + `decode`, the planner asks `prompt_length`, and the
demo's text warm-up puts words in the vision span with `vision_texts`. Prompt (Qwen3 template, thinking
off; only `{caption}<|im_end|>` carries labels):

    <|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n<|vision_start|><|video_pad|>…<|vision_end|>\n
    {user}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n{caption}<|im_end|>
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from vlm.config.schema import PromptConfig
from vlm.model.tokenizer import IM_END, VIDEO_PAD, VISION_END, VISION_START

IGNORE = -100  # label of positions that carry no loss
THINK_BLOCK = re.compile(r"<think>.*?(</think>|$)", re.S)


@dataclass
class TextBatch:
    input_ids: torch.Tensor  # (B, L) long
    attention_mask: torch.Tensor  # (B, L) long, 0 on padding
    labels: torch.Tensor | None = None  # (B, L) long, IGNORE except caption + <|im_end|>


class Processor:
    def __init__(self, tokenizer: Any, prompt: PromptConfig, max_caption_tokens: int) -> None:
        self.tokenizer = tokenizer
        self.prompt = prompt
        self.max_caption_tokens = int(max_caption_tokens)
        self.im_end_id: int = tokenizer.convert_tokens_to_ids(IM_END)
        self.pad_id: int = tokenizer.pad_token_id
        self._prompts: dict[tuple[int, str, str | None], list[int]] = {}

    @property
    def stop_ids(self) -> list[int]:
        """Token ids that end a caption: <|im_end|>, and the pad (<|endoftext|>) a base model may emit."""
        return [self.im_end_id, self.pad_id]

    def with_prompt(self, prompt: PromptConfig) -> Processor:
        return Processor(self.tokenizer, prompt, self.max_caption_tokens)

    # -- prompts ------------------------------------------------------------------------------------
    def prompt_ids(self, n_visual: int, user: str | None = None, vision_text: str | None = None) -> list[int]:
        """System + user turn (with `n_visual` placeholders, or `vision_text` in their place) + assistant header."""
        user = self.prompt.user if user is None else user
        key = (n_visual, user, vision_text)
        if key not in self._prompts:
            video = VISION_START + (VIDEO_PAD * n_visual if vision_text is None else vision_text) + VISION_END
            text = self.tokenizer.apply_chat_template(
                [
                    {"role": "system", "content": self.prompt.system},
                    {"role": "user", "content": f"{video}\n{user}"},
                ],
                tokenize=False,
                add_generation_prompt=True,
                enable_thinking=False,
            )
            self._prompts[key] = self.tokenizer(text, add_special_tokens=False).input_ids
        return self._prompts[key]

    def prompt_length(self, user: str | None = None) -> int:
        """Text tokens of the prompt around the visual tokens (what a step adds besides video and caption)."""
        return len(self.prompt_ids(0, user))

    # -- batches -------------------------------------------------------------------------------------
    def caption_ids(self, captions: list[str]) -> list[list[int]]:
        """Caption tokens cut to `max_caption_tokens`, each followed by <|im_end|>."""
        ids = self.tokenizer(list(captions), add_special_tokens=False).input_ids
        return [[*c[: self.max_caption_tokens], self.im_end_id] for c in ids]

    def train_batch(
        self, captions: list[str], n_visual: int, vision_texts: list[str] | None = None
    ) -> TextBatch:
        """Right-padded prompt + caption rows; labels only on each caption and its <|im_end|>."""
        prompts = [self.prompt_ids(n_visual, vision_text=v) for v in (vision_texts or [None] * len(captions))]
        rows = [p + c for p, c in zip(prompts, self.caption_ids(captions), strict=True)]
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, IGNORE)
        for i, (p, r) in enumerate(zip(prompts, rows, strict=True)):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
            labels[i, len(p) : len(r)] = ids[i, len(p) : len(r)]
        return TextBatch(ids, mask, labels)

    def generation_batch(self, n_visual: int, batch: int, users: list[str] | None = None) -> TextBatch:
        """Left-padded prompts, so every row's last token is the assistant header generation continues."""
        rows = [self.prompt_ids(n_visual, u) for u in (users or [None] * batch)]
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, length - len(r) :] = torch.tensor(r)
            mask[i, length - len(r) :] = 1
        return TextBatch(ids, mask)

    # -- decoding ------------------------------------------------------------------------------------
    def decode(self, ids: torch.Tensor | list[list[int]]) -> list[str]:
        """Generated ids (B, new) → captions: cut at the first stop id, <think> blocks and whitespace dropped."""
        rows = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        stops = set(self.stop_ids)
        out = []
        for row in rows:
            end = next((k for k, t in enumerate(row) if t in stops), len(row))
            out.append(self.clean(self.tokenizer.decode(row[:end])))
        return out

    @staticmethod
    def clean(text: str) -> str:
        """Drop any <think>…</think> block (an unclosed one runs to the end) and outer whitespace."""
        return THINK_BLOCK.sub("", text).strip()
