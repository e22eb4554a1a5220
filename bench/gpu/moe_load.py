"""Part `moe_load`: peak GPU memory while loading the Qwen3-30B-A3B-shaped decoder, vs the plan's load term.

The real architecture (conf/model/qwen3_30b_a3b.yaml) cut to 4 layers, seeded random weights saved in
bf16 in 1 GB shards (the hub's layout), loaded by `load_decoder` (NF4 Linear layers through bitsandbytes,
experts streamed into `FusedMoeExperts` a chunk at a time) straight onto the GPU (`device_map` cuda:0),
saved as an NF4 checkpoint (`save_nf4`) and loaded again from that. Measured: max_memory_allocated and
max_memory_reserved of each load (the allocator's own counters: the CUDA context is not in them), seconds;
planned: `plan_memory(...).load_bytes` for the same directory, less the constant CUDA-context term.
The dry run does the same with the tiny MoE on CPU (no memory figures there).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from bench.gpu.common import MIB, SKIPPED, Deadline, Record, peak, reset_peak

GIB = 2**30


def save_random(arch, out: Path, dtype: torch.dtype, device: str) -> Path:
    """A seeded random model of `arch` saved like a download (config + 1 GB safetensors shards)."""
    from transformers import AutoModelForCausalLM

    from vlm.model.decoder import arch_config

    torch.manual_seed(0)
    with torch.device(device):  # random init on the GPU: seconds instead of minutes on the CPU
        model = AutoModelForCausalLM.from_config(arch_config(arch), dtype=dtype)
    model.save_pretrained(out, max_shard_size="1GB")
    del model
    return out


def run(rec: Record, tiny: bool, deadline: Deadline) -> None:
    from vlm.config import compose, to_typed
    from vlm.model.decoder import load_decoder, save_nf4
    from vlm.plan import plan_memory

    on_gpu = torch.cuda.is_available()
    layers = 2 if tiny else 4
    base = ["model=qwen3_tiny_moe"] if tiny else ["gpu=h100", "model=qwen3_30b_a3b"]
    cfg0 = to_typed(compose("train", base))
    arch = replace(cfg0.model.arch, num_hidden_layers=layers)
    dtype = cfg0.gpu.compute_dtype
    work = Path(tempfile.mkdtemp(prefix="kovicap-moe-load-", dir=os.environ.get("KOVICAP_GPU_WORK")))
    try:
        src, nf4 = work / "bf16", work / "nf4"
        t0 = time.monotonic()
        save_random(arch, src, torch.bfloat16, "cuda" if on_gpu else "cpu")
        rec.set("model", {"arch": "qwen3_tiny_moe" if tiny else "qwen3_30b_a3b", "layers": layers,
                          "compute_dtype": dtype, "write_s": round(time.monotonic() - t0, 1)})  # fmt: skip
        cfg = compose("train", [*base, f"model.name_or_path={src}"])
        plan = plan_memory(cfg)
        ctx = int(to_typed(cfg).plan.cuda_context_gib * GIB)
        rec.set("plan", {"load_gib": round(plan.load_bytes / GIB, 3), "load_note": plan.load_note,
                         "load_gib_without_cuda_context": round((plan.load_bytes - ctx) / GIB, 3)})  # fmt: skip
        device_map = {"": 0} if on_gpu else None
        for name, source in (("from_bf16_shards", src), ("from_nf4_checkpoint", nf4)):
            if deadline.over(reserve=15):
                rec.set(name, SKIPPED)
                continue
            with rec.guard(name):
                model = replace(to_typed(cfg).model, name_or_path=str(source))
                reset_peak()
                t0 = time.monotonic()
                decoder = load_decoder(model, dtype, device_map=device_map)
                seconds = time.monotonic() - t0
                p = peak()
                after = torch.cuda.memory_allocated() if on_gpu else None
                row = {"seconds": round(seconds, 2), **p, "allocated_after": after}
                if p["max_memory_allocated"] is not None:
                    planned = plan.load_bytes - ctx
                    row["peak_gib"] = round(p["max_memory_allocated"] / GIB, 3)
                    row["measured_over_planned"] = round(p["max_memory_allocated"] / planned, 3)
                    row["transient_mib"] = round((p["max_memory_allocated"] - after) / MIB, 1)
                    row["within_15_percent"] = abs(p["max_memory_allocated"] / planned - 1) <= 0.15
                if source == src:
                    save_nf4(decoder, nf4, str(src), None)
                del decoder
                rec.set(name, row)
    finally:
        shutil.rmtree(work, ignore_errors=True)
