"""`use_fused_moe(model)`: swap every Qwen3-MoE experts module of an already built model for `FusedMoeExperts`.

The loader does not use this (it builds the model with fused experts and streams the weights into them,
see `vlm.moe.load`); it serves models built in memory (tests, benchmarks, meta-device builds for the
planner). Idempotent: modules already swapped are left alone. Module paths (and so state-dict prefixes)
do not change; only the experts' own tensors become NF4 buffers, and a dense checkpoint still loads into
the swapped model (see `FusedMoeExperts`). Each dense module is dropped as soon as it is replaced, so the
peak is the NF4 model plus one layer's dense experts, not every layer's.
"""

from __future__ import annotations

import torch
from torch import nn

from vlm.moe.module import BackendName, FusedMoeExperts


def is_dense_experts(module: nn.Module) -> bool:
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    return isinstance(module, Qwen3MoeExperts)


def check_activation(name: str, config: object) -> None:
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{name}: fused experts implement SiLU·up, the model uses {act!r}")


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
    lora_r / lora_alpha: rank and alpha of fresh per-expert LoRA adapters (0: none). Training attaches
        them through the LoRA policy (`vlm.model.lora`) instead.
    """
    names = [name for name, m in model.named_modules() if is_dense_experts(m)]
    for name in names:  # names only: holding the modules would keep every dense layer alive
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        experts = getattr(parent, child)
        check_activation(name, getattr(experts, "config", None))
        e, two_i, h = experts.gate_up_proj.shape
        dev = experts.gate_up_proj.device
        fused = FusedMoeExperts(
            e, h, two_i // 2, backend=backend, lora_r=lora_r, lora_alpha=lora_alpha, device=dev
        )
        if quantize and dev.type != "meta":
            fused.set_dense("gate_up_proj", experts.gate_up_proj)
            fused.set_dense("down_proj", experts.down_proj)
        setattr(parent, child, fused)
        del experts  # the last reference to this layer's dense tensors
    if names and torch.cuda.is_available():
        torch.cuda.empty_cache()  # return the dense experts' memory before training allocates
    return len(names)
