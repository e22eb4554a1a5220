"""Benchmark: the feature cache at the tiers' encoder, ViT-L-14 at 224 px, 16 frames per clip.

    python -m bench.cache [--clips 4]          (make bench)

Side by side in one run, through the real `build_cache` on synthetic H.264 clips:
- stored all patch tokens (what the cache kept before: 16 frames × 256 tokens × 1024, fp16) vs the
  projector's prepared tokens at `projector.pool=4` (16 frames × 16 tokens), bytes per clip on disk;
- the encoding rate (clips/s, decode in one DataLoader worker overlapped with encoding), on this
  machine's CPU in fp32 with random tower weights (the cost does not depend on the weights).
Writes bench/results/cache.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from data.dataset import VideoCaptionDataset
from data.synth import generate
from projector import build_projector
from vlm.config import compose, to_typed
from vlm.model.vision import build_vision
from vlm.train.feature_cache import build_cache

RESULTS = Path(__file__).resolve().parent / "results" / "cache.json"
FRAMES = 16


def shard_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("shard-*.safetensors"))


def main(clips: int = 4) -> dict:
    cfg = to_typed(compose("train", ["gpu=l4", "vision.pretrained=null", "projector.pool=4"]))
    torch.manual_seed(0)
    tower = build_vision(cfg.vision).eval()  # ViT-L-14 (quickgelu), 224 px, 16 x 16 patches
    pooled = build_projector(cfg.projector, tower.width, 4096, tower.grid, 1.0)
    every = build_projector(replace(cfg.projector, pool=tower.grid[0]), tower.width, 4096, tower.grid, 1.0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        generate(str(tmp / "synth"), n_train=clips, n_val=0, seed=0)
        ds = VideoCaptionDataset.from_file(
            tmp / "synth" / "train.jsonl", tmp / "synth", num_frames=FRAMES, size=tower.image_size[0]
        )
        rows = {}
        for name, proj in (("all_patch_tokens", every), ("pooled_4x4", pooled)):

            def encode(frames: torch.Tensor, proj=proj) -> torch.Tensor:  # (B, T, H, W, 3) → (B, T, K, Dv)
                return proj.prepare(tower(frames).float())

            t0 = time.perf_counter()
            st = build_cache(ds, encode, tmp / name, device=torch.device("cpu"), batch_size=1, num_workers=1)
            seconds = time.perf_counter() - t0
            assert st["encoded"] == clips, st
            rows[name] = {
                "tokens_per_frame": proj.tokens_per_frame,
                "bytes_per_clip": shard_bytes(tmp / name) / clips,
                "clips_per_s": clips / seconds,
            }
    before, after = rows["all_patch_tokens"]["bytes_per_clip"], rows["pooled_4x4"]["bytes_per_clip"]
    out = {
        "what": f"feature cache, ViT-L-14 224 px, {FRAMES} frames per clip, fp16 storage, CPU fp32 encoding",
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f}",
        "clips": clips,
        "rows": rows,
        "bytes_ratio_before_over_after": before / after,
    }
    for name, r in rows.items():
        print(
            f"{name:>17}: {r['tokens_per_frame']:4d} tokens/frame  {r['bytes_per_clip'] / 2**20:7.3f} MiB/clip"
            f"  {r['clips_per_s']:.3f} clips/s"
        )
    print(f"stored bytes, all patch tokens / pooled 4x4: {out['bytes_ratio_before_over_after']:.1f}x")
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {RESULTS}")
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clips", type=int, default=4)
    main(ap.parse_args().clips)
