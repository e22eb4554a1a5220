"""Decoder warm-up: the tiny random Qwen3 learns, from text alone, to caption what its vision span says.

A real run starts from a pretrained Qwen3 that reads and paraphrases its prompt; the demo's decoder is
random, so it gets a few hundred steps of the one skill the recipe leans on: words inside the chat
prompt's vision span (where the visual tokens will go) → a Korean caption of them, in any template.
What the span says (`vision_text`):

- "words": the three attribute values, "빨간 원 왼쪽에서 오른쪽으로".
- "frames": one line per sampled frame, what that frame shows: colour and shape in every frame, the
  side the shape is on in the first and last frames ("빨간 원 왼쪽" … "빨간 원 오른쪽"), nothing in
  between. A pretrained LLM reads "left, then right" as "moves from left to right"; this is that skill
  for the tiny decoder, and it is what a per-token projector can say: where the shape is in a frame.

Speed: the corpus uses ~150 of Qwen3's 151,936 token ids, and a full-vocabulary head costs ~40 GFLOP per
step (seconds on an AVX2 CPU). Training runs on those rows only (compact embedding and head, a few KB)
plus a sampled estimate of the other ids' share of the softmax (`rest` bucket: logsumexp over `negatives`
random other rows of the frozen random head, + log of the sampling ratio), so the trained logits must
beat the whole vocabulary, not just each other. The rows are written back into the full model, which
is saved with `save_pretrained`; the full-vocabulary loss on one batch is measured at the end.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from data.korean import MOTIONS, TEMPLATES, make_caption
from vlm.config.schema import ArchConfig
from vlm.model.decoder import arch_config
from vlm.model.processor import IGNORE, Processor
from vlm.train.module import warmup_cosine

log = logging.getLogger(__name__)
# The side words of each motion: (start, end) as the first and last frames show them.
SIDES = {m: tuple(s.strip() for s in m.replace("에서", "|").split("|")) for m in MOTIONS}


def _side(word: str) -> str:
    """ "오른쪽으로" → "오른쪽", "아래로" → "아래": the side itself, without the direction particle."""
    return word.removesuffix("으로").removesuffix("로")


def vision_text(attrs: dict[str, str], style: str, num_frames: int) -> str:
    """What the vision span says in the text warm-up (see the module docstring)."""
    c, s, m = attrs["color"], attrs["shape"], attrs["motion"]
    if style == "words":
        return f"{c} {s} {m}"
    if style != "frames":
        raise ValueError(f"warmup.decoder_text={style!r}: expected 'words' or 'frames'")
    start, end = (_side(w) for w in SIDES[m])
    lines = [f"{c} {s}"] * num_frames
    lines[0], lines[-1] = f"{c} {s} {start}", f"{c} {s} {end}"
    return "\n".join(lines)


def _all_texts(records: list[dict[str, Any]], style: str, num_frames: int) -> list[tuple[str, str]]:
    """Every (vision text, caption) pair the corpus's attribute triples can make, all templates."""
    triples = {tuple(sorted(r["attributes"].items())) for r in records}
    out = []
    for t in sorted(triples):
        a = dict(t)
        out += [
            (vision_text(a, style, num_frames), make_caption(a["color"], a["shape"], a["motion"], k))
            for k in range(len(TEMPLATES))
        ]
    return out


class CompactVocab(nn.Module):
    """Trainable embedding and head rows of the ids in use; the rest of the vocabulary stays frozen."""

    def __init__(self, model: nn.Module, used: torch.Tensor, negatives: int) -> None:
        super().__init__()
        emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        vocab = emb.shape[0]
        self.register_buffer("used", used)
        self.register_buffer("remap", torch.full((vocab,), -1, dtype=torch.long))
        self.remap[used] = torch.arange(len(used))
        other = torch.ones(vocab, dtype=torch.bool)
        other[used] = False
        self.register_buffer("other", other.nonzero().squeeze(1))
        self.emb = nn.Parameter(emb.detach()[used].clone())  # (U, D)
        self.head = nn.Parameter(head.detach()[used].clone())  # (U, D)
        self.frozen_head = head.detach()  # (V, D): the unused rows' logits are the softmax's competitors
        self.negatives = min(negatives, len(self.other))

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.emb[self.remap[ids]]  # (B, L, D)

    def loss(self, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Cross-entropy over [used ids, one bucket for all other ids]: (N, D) hidden, (N,) full-vocab ids."""
        z = hidden @ self.head.T  # (N, U)
        if self.negatives < len(self.other):  # a uniform sample, its logsumexp scaled up to all of them
            pick = self.other[torch.randint(len(self.other), (self.negatives,))]
        else:
            pick = self.other
        rest = (hidden @ self.frozen_head[pick].T).logsumexp(1) + math.log(len(self.other) / len(pick))
        return F.cross_entropy(torch.cat([z, rest[:, None]], 1).float(), self.remap[target])

    @torch.no_grad()
    def write_back(self, model: nn.Module) -> None:
        model.get_input_embeddings().weight[self.used] = self.emb
        model.get_output_embeddings().weight[self.used] = self.head


def warm_decoder(
    arch: ArchConfig,
    processor: Processor,
    records: list[dict[str, Any]],
    out: Path,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    text: str,
    num_frames: int,
    negatives: int = 4096,
    seed: int = 0,
    bf16: bool = False,
    on_step: Callable[[int, float], None] | None = None,
) -> dict[str, Any]:
    """Fine-tune the whole tiny random decoder on (vision text → caption); save it as a HF model directory."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(arch_config(arch), dtype=torch.float32)
    model.train()
    pairs = _all_texts(records, text, num_frames)
    probe = processor.train_batch([c for _, c in pairs], 0, vision_texts=[v for v, _ in pairs])
    used = torch.unique(torch.cat([probe.input_ids.flatten(), torch.tensor(processor.stop_ids)]))
    vocab = CompactVocab(model, used, negatives)
    # Everything trains: the body and the used rows of the input embedding and the head (with the input
    # embedding frozen the old warm-up ran 2x faster but the demo's motion accuracy fell 0.975 → 0.285).
    body = [p for n, p in model.named_parameters() if "embed_tokens" not in n and "lm_head" not in n]
    params = body + list(vocab.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warm = max(1, int(0.05 * steps))  # the training stages' schedule: linear warm-up, cosine to zero
    sched = LambdaLR(opt, lambda s: warmup_cosine(s, steps, warm))
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    rng = random.Random(seed)
    t0, curve = time.time(), []
    for step in range(steps):
        batch = rng.choices(pairs, k=batch_size)
        tb = processor.train_batch([c for _, c in batch], 0, vision_texts=[v for v, _ in batch])
        with autocast():
            hidden = model.model(
                inputs_embeds=vocab.embed(tb.input_ids), attention_mask=tb.attention_mask
            ).last_hidden_state
        keep = tb.labels[:, 1:] != IGNORE
        loss = vocab.loss(hidden[:, :-1][keep].float(), tb.labels[:, 1:][keep])  # label positions only
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        curve.append(loss.item())
        if on_step is not None:
            on_step(step, curve[-1])
    vocab.write_back(model)
    model.eval()
    with torch.no_grad():  # the saved model's real loss, over all 151,936 ids, on one batch
        tb = processor.train_batch([c for _, c in pairs[:64]], 0, vision_texts=[v for v, _ in pairs[:64]])
        hidden = model.model(input_ids=tb.input_ids, attention_mask=tb.attention_mask).last_hidden_state
        keep = tb.labels[:, 1:] != IGNORE  # the head at labelled positions only: full logits of 64
        logits = model.lm_head(hidden[:, :-1][keep])  # sequences took 8 GB and were OOM-killed (measured)
        full = float(F.cross_entropy(logits.float(), tb.labels[:, 1:][keep]))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)  # safetensors + config.json: loadable by the real from_pretrained path
    processor.tokenizer.save_pretrained(out)  # like any model directory, it carries its tokenizer
    log.info("decoder warm-up: %d steps, loss %.3f, full-vocabulary loss %.3f", steps, curve[-1], full)
    return {"seconds": time.time() - t0, "loss_first": curve[0], "loss_last": _tail(curve),
            "full_vocab_loss": full, "used_ids": len(used), "curve": curve}  # fmt: skip


def _tail(curve: list[float], n: int = 20) -> float:
    return sum(curve[-n:]) / min(n, len(curve))
