"""Warm-ups that stand in for pretraining when the tiny parts start random (the CPU demo only).

Real runs start from a pretrained Qwen3 that can read and paraphrase what its prompt says, and from
a CLIP encoder whose features name colours and shapes. The demo's tiny parts get a few minutes of
each instead: the decoder learns, from text alone, to turn the words inside the vision span of the
chat prompt into a Korean caption; the open_clip ViT learns video/caption alignment with open_clip's
own CLIP loss. After that the recipe is the real one (frozen NF4 decoder, stages 1 and 2).
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from vlm.decoder import arch_config, as_dict
from vlm.model import IGNORE, Prompt
from vlm.tokenizer import IM_END, VISION_END, VISION_START

log = logging.getLogger(__name__)


def _attribute_words(attrs: dict[str, str]) -> str:
    return f"{attrs['color']} {attrs['shape']} {attrs['motion']}"


def text_batch(tok: Any, prompt: Prompt, items: list[tuple[str, str]]) -> tuple[torch.Tensor, ...]:
    """(ids, mask, labels) for chat prompts whose vision span holds words instead of video tokens."""
    im_end = tok.convert_tokens_to_ids(IM_END)
    rows, starts = [], []
    for words, caption in items:
        text = tok.apply_chat_template(
            [
                {"role": "system", "content": prompt.system},
                {"role": "user", "content": f"{VISION_START}{words}{VISION_END}\n{prompt.user}"},
            ],
            tokenize=False,
            add_generation_prompt=True,
            enable_thinking=False,
        )
        p = tok(text, add_special_tokens=False).input_ids
        rows.append(p + tok(caption, add_special_tokens=False).input_ids + [im_end])
        starts.append(len(p))
    n = max(len(r) for r in rows)
    ids = torch.full((len(rows), n), tok.pad_token_id)
    mask, labels = torch.zeros_like(ids), torch.full_like(ids, IGNORE)
    for i, (r, s) in enumerate(zip(rows, starts, strict=True)):
        ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
        labels[i, s : len(r)] = ids[i, s : len(r)]
    return ids, mask, labels


def warm_decoder(
    model_cfg: Any,
    tok: Any,
    prompt: Prompt,
    records: list[dict[str, Any]],
    out: Path,
    steps: int = 300,
    batch_size: int = 16,
    lr: float = 2e-3,
    seed: int = 0,
) -> dict[str, Any]:
    """Full fine-tune of the tiny random decoder on caption text; saved as a HF model directory."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(arch_config(as_dict(model_cfg)), dtype=torch.float32)
    model.train()
    # Everything trains, the input embedding included: with it frozen (tried: 160 steps) the
    # warm-up ran 2x faster but the demo's motion accuracy fell from 0.975 to 0.285.
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    pairs = [(_attribute_words(r["attributes"]), c) for r in records for c in r["captions"]]
    rng = random.Random(seed)
    t0, curve = time.time(), []
    for step in range(steps):
        ids, mask, labels = text_batch(tok, prompt, rng.sample(pairs, batch_size))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
            keep = labels[:, 1:] != IGNORE
            logits = model.lm_head(hidden[:, :-1][keep])  # label positions only
        loss = F.cross_entropy(logits.float(), labels[:, 1:][keep])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        curve.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            log.info("decoder warm-up step %d/%d loss %.3f", step, steps, float(loss))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)  # safetensors + config.json: loadable by the real from_pretrained path
    tok.save_pretrained(out)  # like any model directory, it carries its tokenizer
    return {
        "seconds": time.time() - t0,
        "loss_first": curve[0],
        "loss_last": sum(curve[-20:]) / min(20, len(curve)),
    }


class _VideoHead(nn.Module):
    """Per-frame CLIP embeddings (B, T, E) → one video embedding; order matters for motion."""

    def __init__(self, num_frames: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(num_frames * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.flatten(1))


def warm_vision(
    clip: nn.Module,
    frames: torch.Tensor,
    captions: list[list[str]],
    mean: list[float],
    std: list[float],
    out: Path,
    steps: int = 300,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
) -> dict[str, Any]:
    """CLIP-loss warm-up of an open_clip model on (video, caption) pairs; saves its weights."""
    torch.manual_seed(seed)
    n, t = frames.shape[:2]  # frames: (N, T, H, W, 3) uint8
    dim = (
        clip.text_projection.shape[1]
        if isinstance(clip.text_projection, torch.Tensor)
        else clip.text_projection.out_features
    )
    head = _VideoHead(t, dim)
    tokenizer = open_clip.SimpleTokenizer(context_length=clip.context_length)
    loss_fn = open_clip.ClipLoss()
    params = list(clip.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    rng = random.Random(seed)
    clip.train()
    t0, curve = time.time(), []
    for step in range(steps):
        idx = rng.sample(range(n), min(batch_size, n))
        x = frames[idx].flatten(0, 1).permute(0, 3, 1, 2).float() / 255.0  # (B*T, 3, H, W)
        img = clip.encode_image((x - m) / s).view(len(idx), t, -1)  # (B, T, E)
        video = F.normalize(head(img), dim=-1)
        text = F.normalize(clip.encode_text(tokenizer([rng.choice(captions[i]) for i in idx])), dim=-1)
        loss = loss_fn(video, text, clip.logit_scale.exp())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        curve.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            log.info("vision warm-up step %d/%d CLIP loss %.3f", step, steps, float(loss))
    clip.eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, out)
    return {
        "seconds": time.time() - t0,
        "loss_first": curve[0],
        "loss_last": sum(curve[-20:]) / min(20, len(curve)),
    }
