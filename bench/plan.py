"""Planned peak GPU memory for every shipped tier and stage -> bench/results/plan.json.

python -m bench.plan

Planned numbers only: a comparison with `torch.cuda.max_memory_allocated` needs a GPU, and none was
lent when this file was written, so the JSON says so instead of carrying invented measurements.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from vlm.config import compose
from vlm.plan import plan_memory

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "plan.json"
CASES = {
    f"{tier}/{stage}": [f"gpu={tier}", f"train={stage}"]
    for tier in ("t4", "l4", "a100", "h100")
    for stage in ("stage1_projector", "stage2_lora")
}
# 4 videos x (256 visual + 52 prompt + 203 caption + 1) = 2,048 tokens per step, checkpointed. LoRA on
# every routed expert at the shipped r=64 is 2.5 B trainable parameters (38 GiB of fp32 weights, grads and
# AdamW states): the 24 GB question is which rank, or attention-only LoRA, fits.
MOE_2048 = [
    "gpu=h100",
    "train=stage2_lora",
    "train.batch_size=4",
    "data.num_frames=16",
    "data.max_caption_tokens=203",
]
CASES["h100/moe_fused_2048_tokens/stage1_projector"] = [*MOE_2048, "train=stage1_projector"]
CASES["h100/moe_fused_2048_tokens/stage2_lora"] = MOE_2048
for r in (1, 2, 4):
    CASES[f"h100/moe_fused_2048_tokens/stage2_lora_r{r}"] = [*MOE_2048, f"train.lora.r={r}"]
CASES["h100/moe_fused_2048_tokens/stage2_lora_attention_only"] = [
    *MOE_2048,
    "train.lora.target_modules=[q_proj,k_proj,v_proj,o_proj]",
]


def main() -> dict:
    results = {}
    for name, overrides in CASES.items():
        cfg = compose("plan", overrides)
        plan = plan_memory(cfg)
        results[name] = {"overrides": overrides, "model": cfg.model.name_or_path, **plan.to_dict()}
        print(
            f"{name:<56} {plan.total_gib:7.2f} / {plan.capacity_gib:g} GiB  "
            f"headroom {plan.headroom:6.1%}  tokens/step {plan.tokens_per_step}  load {plan.load_bytes / 2**30:.2f} GiB"
        )
    report = {
        "what": "planned peak GPU memory per tier and stage (vlm.plan); no measured numbers",
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores (planning needs no GPU)",
        "gpu_validation": "not measured: no GPU was lent in this session",
        "cases": results,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return report


if __name__ == "__main__":
    main()
