"""Warm-ups that stand in for pretraining when the tiny parts start random (the CPU demo only).

Real runs start from a pretrained Qwen3 that can read and paraphrase what its prompt says, and from
a CLIP encoder whose features name colours and shapes. The demo's tiny parts get a few minutes of
each instead: the decoder learns, from text alone, to turn the words inside the vision span of the
chat prompt into a Korean caption (the processor puts the words where the video tokens go); the
open_clip ViT learns video/caption alignment with open_clip's own CLIP loss. After that the recipe is
the real one (frozen NF4 decoder, stages 1 and 2).
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

from vlm.config.schema import ArchConfig
from vlm.model.decoder import arch_config
from vlm.model.processor import IGNORE, Processor

log = logging.getLogger(__name__)


def attribute_words(attrs: dict[str, str]) -> str:
    return f"{attrs['color']} {attrs['shape']} {attrs['motion']}"


def warm_decoder(
    arch: ArchConfig,
    processor: Processor,
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
    model = AutoModelForCausalLM.from_config(arch_config(arch), dtype=torch.float32)
    model.train()
    # Everything trains, the input embedding included: with it frozen (tried: 160 steps) the
    # warm-up ran 2x faster but the demo's motion accuracy fell from 0.975 to 0.285.
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    pairs = [(attribute_words(r["attributes"]), c) for r in records for c in r["captions"]]
    rng = random.Random(seed)
    t0, curve = time.time(), []
    for step in range(steps):
        words, captions = zip(*rng.sample(pairs, batch_size), strict=True)
        text = processor.train_batch(list(captions), 0, vision_texts=list(words))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            hidden = model.model(
                input_ids=text.input_ids, attention_mask=text.attention_mask
            ).last_hidden_state
            keep = text.labels[:, 1:] != IGNORE
            logits = model.lm_head(hidden[:, :-1][keep])  # label positions only
        loss = F.cross_entropy(logits.float(), text.labels[:, 1:][keep])
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
    processor.tokenizer.save_pretrained(out)  # like any model directory, it carries its tokenizer
    return {"seconds": time.time() - t0, "loss_first": curve[0], "loss_last": sum(curve[-20:]) / min(20, len(curve)),
            "curve": curve}  # fmt: skip


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
    tp = clip.text_projection
    dim = tp.shape[1] if isinstance(tp, torch.Tensor) else tp.out_features
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
    return {"seconds": time.time() - t0, "loss_first": curve[0], "loss_last": sum(curve[-20:]) / min(20, len(curve)),
            "curve": curve}  # fmt: skip
