"""Part `planner`: the memory planner against `max_memory_allocated`, per tier, and training tokens/s.

For each tier (t4 Qwen3-4B fp16, l4 Qwen3-8B, a100 Qwen3-14B, h100 Qwen3-30B-A3B with fused NF4 experts)
the tier's real-shape decoder is cut to 4 layers (seeded random weights, saved in the tier's dtype like a
download) and trained with the tier's own config otherwise (batch, frames, precision, checkpointing,
NF4, LoRA r=64, ViT-L-14 at 224 px with random weights: `vision.pretrained=null`) through the real path:
`build_vlm` -> `CaptionModule` -> Lightning `Trainer.fit`, three steps of stage 1 and of stage 2. The
batches are the collator's own output over in-memory frames (uint8, random) and a caption long enough to
fill `data.max_caption_tokens`, so no video is decoded (decord and av are not on the GPU machine) and
the step is the one the planner plans. Measured per stage: max_memory_allocated over the steps (the
allocator's counter: the CUDA context and the allocator's slack are not in it, so it is compared with
the plan's total less its `cuda_context` and `allocator_fragmentation` terms; max_memory_reserved is
compared with the total less the context), seconds per step after the first, tokens/s.
Target: measured within +-15 % of planned. The dry run: the cpu tier's tiny model, no memory figures.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from bench.gpu.common import SKIPPED, Deadline, Record, peak, reset_peak

GIB = 2**30
LAYERS = 4
TIERS = ("t4", "l4", "a100", "h100")
CAPTION = "빨간 원이 화면 왼쪽에서 오른쪽으로 천천히 움직이고, 파란 사각형은 제자리에서 회전한다. " * 40


def model_dir(tier: str, work: Path, tiny: bool) -> Path:
    """The tier decoder's real architecture with LAYERS layers, random weights, saved with a tokenizer."""
    from transformers import AutoModelForCausalLM

    from vlm.config import compose, to_typed
    from vlm.model.decoder import DTYPES, arch_config
    from vlm.model.tokenizer import load_tokenizer

    out = work / f"{tier}-{LAYERS}l"
    if (out / "config.json").is_file():
        return out
    cfg = to_typed(compose("train", [] if tiny else [f"gpu={tier}"]))
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(
            arch_config(replace(cfg.model.arch, num_hidden_layers=2 if tiny else LAYERS)),
            dtype=DTYPES[cfg.gpu.compute_dtype],
        )
    model.save_pretrained(out, max_shard_size="2GB")
    load_tokenizer().save_pretrained(out)
    del model
    return out


class StepProbe:
    """Lightning callback: per step, peak allocated memory and wall time (the first step is warm-up)."""

    def __new__(cls):
        import lightning.pytorch as L

        from bench.gpu.common import sync

        class _Probe(L.Callback):
            def __init__(self) -> None:
                self.steps: list[dict[str, Any]] = []

            def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
                sync()
                self.t0 = time.perf_counter()
                self.tokens = int(batch["attention_mask"].sum())

            def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
                sync()
                self.steps.append({"seconds": time.perf_counter() - self.t0, "tokens": self.tokens, **peak()})

        return _Probe()


def batches(cfg, vlm, processor, n: int):
    """A DataLoader of `n` batches as the collator makes them, over in-memory random frames."""
    from torch.utils.data import DataLoader

    from vlm.train.data import Collator

    t, s = cfg.data.num_frames, cfg.vision.image_size
    g = torch.Generator().manual_seed(0)
    items = [{"frames": torch.randint(0, 256, (t, s, s, 3), dtype=torch.uint8, generator=g), "caption": CAPTION,
              "captions": [CAPTION], "video": f"v{i}.mp4"} for i in range(n * cfg.train.batch_size)]  # fmt: skip
    return DataLoader(
        items, batch_size=cfg.train.batch_size, collate_fn=Collator(processor, vlm.projector.num_tokens)
    )


def one_stage(overrides: list[str], steps: int, out: Path) -> dict[str, Any]:
    import lightning.pytorch as L

    from vlm.config import compose, to_typed
    from vlm.model.build import build_vlm, trainable_parameters
    from vlm.plan import plan_memory
    from vlm.train.module import CaptionModule

    cfg = to_typed(compose("train", [*overrides, f"output_dir={out}"]))
    plan = plan_memory(cfg)
    reset_peak()
    vlm, processor = build_vlm(cfg)
    module = CaptionModule(vlm, processor, cfg.train, config={})
    probe = StepProbe()
    t = cfg.trainer
    on_gpu = torch.cuda.is_available()
    trainer = L.Trainer(accelerator="gpu" if on_gpu else "cpu", devices=1, precision=t.precision if on_gpu else "32-true",
                        max_steps=steps, max_epochs=-1, accumulate_grad_batches=1,
                        gradient_clip_val=cfg.train.gradient_clip_val, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=[probe], default_root_dir=out)  # fmt: skip
    trainer.fit(module, train_dataloaders=batches(cfg, vlm, processor, steps))
    later = probe.steps[1:] or probe.steps
    sec = sum(s["seconds"] for s in later) / len(later)
    row: dict[str, Any] = {
        "layers": plan.layers,
        "batch": cfg.train.batch_size,
        "frames": cfg.data.num_frames,
        "precision": t.precision if on_gpu else "32-true",
        "trainable_params": trainable_parameters(module),
        "plan_total_gib": round(plan.total_gib, 3),
        "plan_terms_gib": {n: round(b / GIB, 4) for n, b, _ in plan.terms},
        "steps": probe.steps,
        "seconds_per_step": round(sec, 4),
        "tokens_per_step": later[-1]["tokens"],
        "train_tokens_per_s": round(later[-1]["tokens"] / sec, 1),
    }
    alloc = max((s["max_memory_allocated"] or 0) for s in probe.steps) if on_gpu else None
    if alloc:
        ctx, frag = plan.term("cuda_context"), plan.term("allocator_fragmentation")
        planned = plan.total_bytes - ctx - frag
        reserved = max(s["max_memory_reserved"] for s in probe.steps)
        row.update(measured_allocated_gib=round(alloc / GIB, 3), planned_allocated_gib=round(planned / GIB, 3),
                   measured_over_planned=round(alloc / planned, 3), within_15_percent=abs(alloc / planned - 1) <= 0.15,
                   measured_reserved_gib=round(reserved / GIB, 3),
                   reserved_over_planned_without_context=round(reserved / (plan.total_bytes - ctx), 3))  # fmt: skip
    del trainer, module, vlm
    reset_peak()
    return row


def run(rec: Record, tiny: bool, deadline: Deadline) -> None:
    work = Path(tempfile.mkdtemp(prefix="kovicap-planner-", dir=os.environ.get("KOVICAP_GPU_WORK")))
    try:
        for tier in ("cpu",) if tiny else TIERS:
            if deadline.over(reserve=20):
                rec.set(tier, SKIPPED)
                continue
            with rec.guard(tier):
                src = model_dir(tier, work, tiny)
                over = [f"model.name_or_path={src}", "vision.pretrained=null", "progress=false"]
                if tiny:  # the dry run: the code path, not the tier's size
                    over += ["train.batch_size=1", "data.num_frames=2", "data.max_caption_tokens=8"]
                else:
                    over.insert(0, f"gpu={tier}")
                res: dict[str, Any] = {}
                for stage in ("stage1_projector", "stage2_lora"):
                    if deadline.over(reserve=10):
                        res[stage] = SKIPPED
                        continue
                    try:
                        res[stage] = one_stage([*over, f"train={stage}"], 1 if tiny else 3, work / stage)
                    except Exception as e:
                        from bench.gpu.common import error_record

                        res[stage] = error_record(e)
                    rec.set(tier, res)
                shutil.rmtree(src, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
