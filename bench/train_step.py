"""Stage-1 step time with the vision-feature cache vs without, side by side in one run.

    python -m bench.train_step            # writes bench/results/train_step.json

Without the cache every step decodes nothing (frames are in memory) but runs the frozen encoder on
B x T frames; with it the step starts from the stored, already pooled features (the projector's
parameter-free first step). Measured on the tiny decoder
with two encoders: the tiny ViT of the demo and a ViT-B-16-sized random open_clip ViT at 224 px.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from vlm.config import compose, to_typed
from vlm.model.build import build_vlm

OUT = Path(__file__).resolve().parent / "results" / "train_step.json"


def step_times(
    vlm, proc, frames: torch.Tensor, captions: list[str], cached: bool, repeats: int
) -> list[float]:
    params = [p for p in vlm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    feats = vlm.projector.prepare(vlm.encode(frames)).half() if cached else None  # what the cache hands back
    text = proc.train_batch(
        captions, vlm.projector.num_tokens(frames.shape[1])
    )  # the collator's work, in workers
    times = []
    for _ in range(repeats + 1):  # the first is warm-up
        t0 = time.perf_counter()
        f = feats if cached else vlm.encode(frames)
        loss = vlm.loss(f, text.input_ids, text.attention_mask, text.labels, prepared=cached)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return times[1:]


def main(repeats: int = 5, batch: int = 8, frames_per_video: int = 4) -> dict:
    torch.manual_seed(0)
    rows = []
    for name, overrides in (
        ("tiny ViT (demo), 64 px", ["vision=tiny"]),
        ("ViT-B-16-sized random, 224 px", ["vision=tiny", "vision.image_size=224",
            "vision.model_cfg.vision_cfg={image_size: 224, layers: 12, width: 768, head_width: 64, patch_size: 16}"]),
    ):  # fmt: skip
        cfg = to_typed(compose("train", ["train=stage1_projector", *overrides]))
        vlm, proc = build_vlm(cfg)
        size = cfg.vision.image_size
        frames = torch.randint(0, 256, (batch, frames_per_video, size, size, 3), dtype=torch.uint8)
        caps = ["빨간 원이 왼쪽에서 오른쪽으로 움직인다."] * batch
        a, b = [], []
        for _ in range(repeats):  # interleave so both see the same machine load
            a += step_times(vlm, proc, frames, caps, cached=False, repeats=1)
            b += step_times(vlm, proc, frames, caps, cached=True, repeats=1)
        no_cache, cache = statistics.median(a), statistics.median(b)
        rows.append({"encoder": name, "no_cache_s": no_cache, "cache_s": cache, "speedup": no_cache / cache})
    result = {
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "accelerator": "none (CPU-only run; no GPU figures)"},
        "batch": batch, "frames_per_video": frames_per_video, "repeats": repeats, "rows": rows,
    }  # fmt: skip
    print("| encoder | step without cache (s) | step with cache (s) | speed-up |\n| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['encoder']} | {r['no_cache_s']:.3f} | {r['cache_s']:.3f} | {r['speedup']:.1f}x |")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
