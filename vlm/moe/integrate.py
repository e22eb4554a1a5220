"""`use_fused_moe(model)`: swap every Qwen3-MoE experts module of a loaded model for `FusedMoeExperts`.

Called by the model loader after `from_pretrained` when `model.moe_kernel == "fused"`. Idempotent:
modules already swapped are left alone, so calling it twice swaps nothing the second time. Module
paths (and so state-dict prefixes) do not change; only the experts' own tensors become NF4 buffers,
and a dense checkpoint still loads into the swapped model (see `FusedMoeExperts`).
"""

from __future__ import annotations

import torch
from torch import nn

from vlm.moe.module import BackendName, FusedMoeExperts


def _is_qwen3_moe_experts(module: nn.Module) -> bool:
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    return isinstance(module, Qwen3MoeExperts)


def use_fused_moe(
    model: nn.Module,
    *,
    quantize: bool = True,
    backend: BackendName = "auto",
    lora_r: int = 0,
    lora_alpha: float | None = None,
) -> int:
    """Replace each `Qwen3MoeExperts` in `model` with NF4 `FusedMoeExperts`; returns how many were swapped.

    quantize: True quantizes the loaded (bf16/fp16/fp32) expert weights now, one layer at a time, and
        frees the dense copies. False only allocates empty NF4 buffers (e.g. for a model built on the
        meta device) that a later `load_state_dict` fills from dense or NF4 tensors.
    backend: "auto" (Triton on CUDA, PyTorch elsewhere), "triton" or "torch".
    lora_r / lora_alpha: rank and alpha of per-expert LoRA adapters (0: none); only the adapters train.
    """
    targets = [(name, m) for name, m in model.named_modules() if _is_qwen3_moe_experts(m)]
    for name, experts in targets:
        act = getattr(getattr(experts, "config", None), "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"{name}: fused experts implement SiLU·up, the model uses {act!r}")
        if quantize:
            fused = FusedMoeExperts.from_experts(
                experts, backend=backend, lora_r=lora_r, lora_alpha=lora_alpha
            )
        else:
            e, two_i, h = experts.gate_up_proj.shape
            dev = experts.gate_up_proj.device
            fused = FusedMoeExperts(
                e,
                h,
                two_i // 2,
                backend=backend,
                lora_r=lora_r,
                lora_alpha=lora_alpha,
                device=None if dev.type == "meta" else dev,
            )
        if fused.lora is not None:
            fused.lora.to(
                experts.gate_up_proj.dtype if experts.gate_up_proj.dtype.is_floating_point else None
            )
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, fused)
        del experts
    if targets and torch.cuda.is_available():
        torch.cuda.empty_cache()  # return the dense experts' memory before training allocates
    return len(targets)
