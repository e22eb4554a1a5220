"""Fused 4-bit MoE experts for Qwen3-MoE (Qwen3-30B-A3B): NF4 storage, Triton and PyTorch paths.

Public API:
    use_fused_moe(model, *, quantize=True, backend="auto", lora_r=0, lora_alpha=None) -> int
    expert_bytes(num_experts, hidden, intermediate) -> int
    FusedMoeExperts (with `add_lora`), ExpertLoRA, quantize_nf4, dequantize_nf4, NF4Experts
    vlm.moe.load: build with fused experts and stream a checkpoint's experts into NF4 (the loader's path)
    vlm.moe.adapter_format: ExpertLoRA <-> peft's 3D `target_parameters` layout and vLLM's per-expert one
Triton is imported only when the Triton backend is first used (tests set TRITON_INTERPRET=1 first).
"""

from vlm.moe.integrate import use_fused_moe
from vlm.moe.lora import ExpertLoRA
from vlm.moe.module import FusedMoeExperts
from vlm.moe.nf4 import NF4Experts, dequantize_nf4, expert_bytes, quantize_nf4

__all__ = [
    "ExpertLoRA",
    "FusedMoeExperts",
    "NF4Experts",
    "dequantize_nf4",
    "expert_bytes",
    "quantize_nf4",
    "use_fused_moe",
]
