"""Part `moe_layer`: one Qwen3-30B-A3B MoE experts layer, our fused NF4 Triton path against the others.

Shape: E 128 experts, top-8, H 2048, I 768 (conf/model/qwen3_30b_a3b.yaml), T 2,048 and 8,192 tokens,
random softmax-top-8 routing, bf16 (`bench.moe.build` / `routing`: the eager module holds exactly our
de-quantized NF4 weights, so every row computes the same thing). Rows, timed interleaved, median:
  fused NF4 Triton              `FusedMoeExperts` backend=triton: NF4 de-quantized inside the GEMM loop
  ours, PyTorch path            backend=torch: NF4 de-quantized per tile of experts, `torch._grouped_mm`
  NF4 -> bf16, torch._grouped_mm   the whole layer de-quantized to bf16 each call (bitsandbytes' CUDA
                                kernel), then transformers' `grouped_mm` experts (the simple alternative)
  transformers grouped_mm       bf16 weights resident (3.9x the NF4 bytes), `grouped_mm`
  transformers eager            bf16 weights resident, the loop over experts
Forward runs under no_grad; forward+backward back-propagates into hidden states and routing weights
(the experts are frozen: QLoRA). Per row: ms, tokens/s, ratios to fused, max_memory_allocated above the
inputs; for fused also achieved TFLOP/s and GB/s against the H200's 790 TFLOP/s and 4.3 TB/s.
"""

from __future__ import annotations

from typing import Any

import torch

from bench.gpu.common import (
    H200_BF16_FLOPS,
    H200_BYTES_PER_S,
    MIB,
    SKIPPED,
    Deadline,
    Record,
    interleaved_ms,
    peak,
    reset_peak,
)

FUSED = "fused NF4 Triton"
EAGER, GROUPED = "transformers eager", "transformers grouped_mm (bf16)"


def runs(fused, cfg, ref, simple, x, idx, w) -> dict[str, Any]:
    """name -> fn(backward) -> output or input gradient."""
    from bench.moe import run_step
    from vlm.moe.nf4 import dequantize_fast

    def step(module, backward: bool):
        return run_step(module, x, idx, w, backward)

    def ours(backend: str):
        def fn(backward: bool):
            fused.backend_name = backend
            return step(fused, backward)

        return fn

    def transformers_impl(impl: str, module, dequantize: bool = False):
        def fn(backward: bool):
            cfg._experts_implementation = impl
            if dequantize:  # fresh 16-bit copies every call: nothing 16-bit stays resident
                module.gate_up_proj.data = dequantize_fast(fused.nf4("gate_up_proj"), x.dtype)
                module.down_proj.data = dequantize_fast(fused.nf4("down_proj"), x.dtype)
            return step(module, backward)

        return fn

    return {
        FUSED: ours("triton"),
        "ours, PyTorch path (tiles, torch._grouped_mm)": ours("torch"),
        "NF4 -> bf16 layer, then torch._grouped_mm": transformers_impl("grouped_mm", simple, True),
        GROUPED: transformers_impl("grouped_mm", ref),
        EAGER: transformers_impl("eager", ref),
    }


def flops_bytes(
    t: int, k: int, h: int, i: int, nf4_bytes: int, b: int, backward: bool
) -> tuple[float, float]:
    """FLOPs and the fewest bytes the fused path must move. Forward: gate_up 2·P·2I·H + down 2·P·I·H
    (P = T·k rows); the input-gradient backward does the same products again. Bytes: the NF4 weights once
    per pass over them, x in and the output out (T·H each), h written and read (P·I, twice); backward
    adds the same plus the saved gate/up pre-activations (P·2I) read back."""
    p = t * k
    flops = 6.0 * p * h * i
    moved = nf4_bytes + b * (2 * t * h + 2 * p * i)
    if backward:
        flops, moved = 2 * flops, 2 * moved + b * p * 2 * i
    return flops, moved


def run(rec: Record, tiny: bool, deadline: Deadline) -> None:
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    from bench.moe import build, routing
    from vlm.moe import expert_bytes

    on_gpu = torch.cuda.is_available()
    dev, dtype = ("cuda", torch.bfloat16) if on_gpu else ("cpu", torch.float32)
    e, h, i, k = (4, 32, 16, 2) if tiny else (128, 2048, 768, 8)
    tokens, repeats = ((19,), 1) if tiny else ((2048, 8192), 7)  # tiny: T*k not a multiple of the block
    nf4 = expert_bytes(e, h, i)
    rec.set("shape", {"num_experts": e, "hidden": h, "intermediate": i, "top_k": k, "tokens": list(tokens),
                      "dtype": str(dtype).removeprefix("torch."), "device": dev, "repeats": repeats})  # fmt: skip
    rec.set("memory", {"nf4_expert_bytes": nf4, "bf16_expert_bytes": 2 * 3 * e * h * i,
                       "bf16_over_nf4": round(2 * 3 * e * h * i / nf4, 3)})  # fmt: skip
    fused, cfg, ref = build(e, h, i, dtype, dev)
    simple_cfg = Qwen3MoeConfig(hidden_size=h, moe_intermediate_size=i, num_experts=e)
    simple = Qwen3MoeExperts(simple_cfg).to(dev).requires_grad_(False)
    simple.gate_up_proj.data, simple.down_proj.data = torch.empty(0), torch.empty(0)  # filled per call
    if not on_gpu:
        rec.set("note", "CPU dry run: Triton interpreted, fp32; timings are not GPU figures")
    for t in tokens:
        idx, w = routing(t, e, k, dtype, dev)
        x = torch.randn(t, h, dtype=dtype, device=dev, generator=None)
        fns = runs(fused, cfg, ref, simple, x, idx, w)
        key = f"T={t}"
        if deadline.over(reserve=10):
            rec.set(key, SKIPPED)
            continue
        with rec.guard(key):
            block: dict[str, Any] = {}
            with torch.no_grad():  # every row against eager, forward
                base = fns[EAGER](False).float()
                block["max_abs_diff_vs_eager"] = {
                    n: float((fn(False).float() - base).abs().max()) for n, fn in fns.items()
                }
            for mode, bwd in (("forward", False), ("forward+backward", True)):
                ms = interleaved_ms(
                    {n: (lambda f=f, bwd=bwd: f(bwd)) for n, f in fns.items()},
                    repeats,
                    warmup=0 if tiny else 1,
                )
                rows = {}
                for n, fn in fns.items():
                    mem = None
                    if on_gpu:  # the allocator's peak of one more call (no such counter on the CPU)
                        before = reset_peak()
                        fn(bwd)
                        mem = peak()["max_memory_allocated"]
                    med = ms[n]["median_ms"]
                    rows[n] = {**ms[n], "tokens_per_s": round(t / med * 1e3),
                               "this_over_fused_ms": round(med / ms[FUSED]["median_ms"], 3),
                               "peak_mib_above_inputs": None if mem is None else round((mem - before) / MIB, 1)}  # fmt: skip
                fl, by = flops_bytes(t, k, h, i, nf4, x.element_size(), bwd)
                f_s = ms[FUSED]["median_ms"] / 1e3
                block[mode] = {
                    "rows": rows,
                    "fused_tflops": float(f"{fl / f_s / 1e12:.4g}"),
                    "fused_gbps": round(by / f_s / 1e9, 1),
                    "fused_share_of_peak_flops": round(fl / f_s / H200_BF16_FLOPS, 4),
                    "fused_share_of_peak_bandwidth": round(by / f_s / H200_BYTES_PER_S, 4),
                    "roofline_ms": float(f"{max(fl / H200_BF16_FLOPS, by / H200_BYTES_PER_S) * 1e3:.4g}"),
                    "eager_over_fused": rows[EAGER]["this_over_fused_ms"],
                    "grouped_mm_over_fused": rows[GROUPED]["this_over_fused_ms"],
                }
                if on_gpu and not tiny:
                    block[mode]["target_5x_eager_met"] = rows[EAGER]["this_over_fused_ms"] >= 5.0
                    block[mode]["target_1.2x_grouped_mm_met"] = rows[GROUPED]["this_over_fused_ms"] >= 1.2
            rec.set(key, block)
