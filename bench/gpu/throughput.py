"""Part `throughput`: captioning videos/s and the feature-cache encoding rate on a real-shape model.

Model: the l4 tier's decoder (Qwen3-8B's shapes, 4 layers, random weights; `bench.gpu.planner.model_dir`)
with ViT-L-14 at 224 px (random) and the tier's projector, built by `build_vlm` and moved to the GPU.
- captioning: `VLM.generate` from the tower's patch features (random, the tier's 8 frames) with the
  processor's generation prompt, greedy, exactly `max_new_tokens` new tokens per video (random weights
  rarely stop early; the count is recorded), batch 1 vs 16, decoder in NF4 (`model.quantize=nf4`) vs
  bf16 (`model.quantize=none`: what a merged export loads). videos/s and new tokens/s, median of runs.
- encoding: the frozen tower + the projector's `prepare` (what the feature cache stores) on 16 frames a
  video, batch 8: videos/s. Frames are in memory: decoding (decord, not on the GPU machine) is excluded.
The dry run uses the cpu tier's tiny parts.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from bench.gpu.common import SKIPPED, Deadline, Record, interleaved_ms, reset_peak


def build(overrides: list[str]):
    from vlm.config import compose, to_typed
    from vlm.model.build import build_vlm

    cfg = to_typed(compose("train", [*overrides, "train=stage1_projector"]))
    vlm, processor = build_vlm(cfg)
    return cfg, vlm.to("cuda" if torch.cuda.is_available() else "cpu").eval(), processor


def caption_rates(
    cfg, vlm, processor, batches: tuple[int, ...], new_tokens: int, repeats: int
) -> dict[str, Any]:
    dev = next(vlm.projector.parameters()).device
    t, (gh, gw), dv = cfg.data.num_frames, vlm.vision.grid, vlm.vision.width
    out: dict[str, Any] = {}
    fns, counts = {}, {}
    for b in batches:
        feats = torch.randn(b, t, gh * gw, dv, device=dev, dtype=next(vlm.vision.parameters()).dtype)
        text = processor.generation_batch(vlm.projector.num_tokens(t), b)

        def gen(feats=feats, text=text, b=b):
            ids = vlm.generate(feats, text.input_ids, text.attention_mask, processor.stop_ids, processor.pad_id,
                               max_new_tokens=new_tokens)  # fmt: skip
            counts[b] = int((ids != processor.pad_id).sum())
            return ids

        fns[f"batch={b}"] = gen
    ms = interleaved_ms(fns, repeats)
    for b in batches:
        m = ms[f"batch={b}"]["median_ms"]
        out[f"batch={b}"] = {**ms[f"batch={b}"], "videos_per_s": round(b / m * 1e3, 3),
                             "new_tokens": counts[b], "new_tokens_per_s": round(counts[b] / m * 1e3, 1)}  # fmt: skip
    return out


def run(rec: Record, tiny: bool, deadline: Deadline) -> None:
    from bench.gpu.planner import model_dir

    work = Path(tempfile.mkdtemp(prefix="kovicap-throughput-", dir=os.environ.get("KOVICAP_GPU_WORK")))
    tier = "cpu" if tiny else "l4"
    batches, new_tokens, repeats = ((1, 2), 2, 1) if tiny else ((1, 16), 32, 3)
    try:
        src = model_dir(tier, work, tiny)
        base = [f"model.name_or_path={src}", "vision.pretrained=null"]
        base += ["data.num_frames=2"] if tiny else [f"gpu={tier}"]
        rec.set("setup", {"tier": tier, "model": "tiny" if tiny else "Qwen3-8B shapes, 4 layers", "batches": list(batches),
                          "max_new_tokens": new_tokens, "repeats": repeats})  # fmt: skip
        for quant in ("nf4", "none"):
            key = f"caption_{'nf4' if quant == 'nf4' else 'bf16'}"
            if deadline.over(reserve=15):
                rec.set(key, SKIPPED)
                continue
            with rec.guard(key):
                cfg, vlm, processor = build([*base, f"model.quantize={quant}"])
                rec.set(key, caption_rates(cfg, vlm, processor, batches, new_tokens, repeats))
                if quant == "nf4":  # the same tower and projector encode for the cache
                    with rec.guard("encode"):
                        frames_n, b = (2, 2) if tiny else (16, 8)
                        s = cfg.vision.image_size
                        dev = next(vlm.projector.parameters()).device
                        frames = torch.randint(0, 256, (b, frames_n, s, s, 3), dtype=torch.uint8, device=dev)
                        with torch.no_grad():
                            ms = interleaved_ms(
                                {"encode": lambda v=vlm, f=frames: v.projector.prepare(v.encode(f))}, repeats
                            )
                        m = ms["encode"]["median_ms"]
                        rec.set("encode", {**ms["encode"], "batch": b, "frames": frames_n, "image_size": s,
                                           "videos_per_s": round(b / m * 1e3, 2)})  # fmt: skip
                del vlm
                reset_peak()
    finally:
        shutil.rmtree(work, ignore_errors=True)
