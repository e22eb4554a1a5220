"""Vision warm-up: the tiny random open_clip ViT learns what a pretrained tower would already know.

A real tower arrives pretrained: its patch tokens name colours and shapes and say where things are. The
demo's tower is random, so it is trained, on the training split only, to tell each clip's colour, shape
and motion from the tokens the projector will read: the patch tokens of `feature_layer`, pooled per
frame to pool x pool exactly as `Projector.prepare` does, flattened in frame order, through one linear
head per attribute (an attribute-labelled pretraining, like an ImageNet-pretrained tower's).

Why not CLIP/SigLIP on (clip, caption) pairs, as earlier versions did: measured on this corpus (seed 0,
200 steps, batch 32, held-out linear probe of the pooled tokens), open_clip's SigLIP loss with
same-triple positives, captions plus attribute words plus single-attribute words as text, left shape at
0.68-0.76 whatever the mix, temperature or tokenizer (CLIP's BPE or Qwen's), because the 1-layer text
tower never told the shape words apart (cosine 0.95-1.00 between 원, 사각형 and 삼각형 after the
warm-up): the contrastive signal for shape never reached the image side. These heads reach 0.98-0.99
in the same steps. The heads are dropped afterwards; only the tower's weights are saved.

Why also one head shared by every token (`TokenHeads`): the clip heads read the tokens flattened, so a
token need not say where it is (the head's weights do), and the projector, which maps each token alone,
then has nothing to turn into "left" or "right": stage 1 read colour 1.00 and shape 0.92 but motion 0.28
(seed 0, 250 steps). The shared head makes every pooled token name, by itself, the clip's colour and
shape and where along the motion's axis the shape is in that frame (-1 at the start edge, +1 at the end,
`frame_positions`), which is what the per-frame vision text of the decoder warm-up says.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from data.korean import MOTIONS, VOCAB
from vlm.config.schema import VisionConfig
from vlm.demo.probe import labels
from vlm.model.vision import VisionTower, build_vision
from vlm.train.module import warmup_cosine

log = logging.getLogger(__name__)


def pool_tokens(feats: torch.Tensor, grid: tuple[int, int], pool: int) -> torch.Tensor:
    """(B, T, P, Dv) → (B, T, pool², Dv): the same per-frame average pooling as `Projector.prepare`."""
    b, t, _, dv = feats.shape
    x = feats.reshape(b * t, grid[0], grid[1], dv).permute(0, 3, 1, 2)
    x = F.adaptive_avg_pool2d(x, pool)  # (BT, Dv, pool, pool); row-major keeps where things are
    return x.flatten(2).transpose(1, 2).reshape(b, t, pool * pool, dv)


def trainable_tower(cfg: VisionConfig) -> VisionTower:
    """The tower `cfg` describes (its seeded random weights), unfrozen."""
    return build_vision(dataclasses.replace(cfg, freeze=False, weights=None))


@torch.no_grad()
def encode_pooled(tower: VisionTower, frames: torch.Tensor, pool: int, batch: int = 64) -> torch.Tensor:
    """(N, T, H, W, 3) uint8 → (N, T, pool², Dv) float32: what the feature cache will store."""
    was = tower.training
    tower.eval()
    out = [
        pool_tokens(tower(frames[i : i + batch]).float(), tower.grid, pool)
        for i in range(0, len(frames), batch)
    ]
    tower.train(was)
    return torch.cat(out)


class AttributeHeads(nn.Module):
    """(B, T, K, Dv) pooled tokens → {attribute: (B, values) logits}; flattened in frame order, so the
    motion head can compare where the shape is in the first and the last frame."""

    def __init__(self, tokens: int, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.heads = nn.ModuleDict({k: nn.Linear(tokens * width, len(v)) for k, v in VOCAB.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.norm(x).flatten(1)
        return {k: h(x) for k, h in self.heads.items()}


class TokenHeads(nn.Module):
    """(B, T, K, Dv) pooled tokens → per token: colour and shape logits, and the (x, y) of the shape in
    its frame; one set of weights for every token and frame, so each token must carry it itself."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.heads = nn.ModuleDict({k: nn.Linear(width, len(VOCAB[k])) for k in ("color", "shape")})
        self.where = nn.Linear(width, 2)

    def forward(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        x = self.norm(x)
        return {k: h(x) for k, h in self.heads.items()}, self.where(x)  # (B, T, K, C), (B, T, K, 2)


def frame_positions(motions: list[str], num_frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the shape is along its motion's axis in each sampled frame: (N, T, 2) x, y in [-1, 1]
    (image axes: x right, y down), and the (N, 1, 2) mask of the axis the motion gives (the other
    coordinate is random in the corpus, so it is not a target)."""
    u = torch.linspace(-1.0, 1.0, num_frames)  # frames sampled evenly from start to end
    d = torch.tensor([MOTIONS[m] for m in motions], dtype=torch.float32)  # (N, 2): +-1 on one axis
    return d[:, None, :] * u[None, :, None], (d != 0).float()[:, None, :]


def warm_vision(
    cfg: VisionConfig,
    frames: torch.Tensor,
    attrs: list[dict[str, str]],
    out: Path,
    *,
    pool: int,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int = 0,
    bf16: bool = False,
    on_step: Callable[[int, float], None] | None = None,
) -> tuple[dict[str, Any], VisionTower]:
    """Train the tower `cfg` builds on (N, T, H, W, 3) uint8 frames and their attributes; save its
    weights (a tower state dict, what `vision.weights` loads). Returns (stats, the tower in eval mode)."""
    torch.manual_seed(seed)
    tower = trainable_tower(cfg)
    n, t = frames.shape[:2]
    heads, token_heads = AttributeHeads(t * pool * pool, tower.width), TokenHeads(tower.width)
    ys = {k: labels(attrs, k) for k in VOCAB}
    where, axis = frame_positions([a["motion"] for a in attrs], t)  # (N, T, 2), (N, 1, 2)
    params = [*tower.parameters(), *heads.parameters(), *token_heads.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.1)
    warm = max(1, int(0.1 * steps))  # the training stages' schedule: linear warm-up, cosine to zero
    sched = LambdaLR(opt, lambda s: warmup_cosine(s, steps, warm))
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    rng = random.Random(seed)
    tower.train()
    t0, curve = time.time(), []
    for step in range(steps):
        idx = rng.sample(range(n), min(batch_size, n))
        with autocast():
            tokens = pool_tokens(tower(frames[idx]), tower.grid, pool)  # (B, T, K, Dv)
            logits = heads(tokens)
            tok_logits, tok_where = token_heads(tokens)
        loss = sum(F.cross_entropy(logits[k].float(), ys[k][idx]) for k in VOCAB)
        k_tokens = tokens.shape[2]
        for k, z in tok_logits.items():  # every token names the clip's colour and shape
            loss = loss + F.cross_entropy(z.float().flatten(0, 2), ys[k][idx].repeat_interleave(t * k_tokens))
        err = (tok_where.float() - where[idx][:, :, None, :]).pow(2) * axis[idx][:, :, None, :]
        loss = loss + err.sum() / (axis[idx].sum() * t * k_tokens)  # and where the shape is in its frame
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        curve.append(loss.item())
        if on_step is not None:
            on_step(step, curve[-1])
    tower.eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tower.visual.state_dict().items()}, out)
    log.info("vision warm-up: %d steps, loss %.3f", steps, curve[-1])
    stats = {"seconds": time.time() - t0, "loss_first": curve[0], "loss_last": sum(curve[-20:]) / min(20, len(curve)),
             "curve": curve}  # fmt: skip
    return stats, tower
