"""Decoder preparation for training: frozen (stage 1) or QLoRA (stage 2) through peft."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from torch import nn

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def is_quantized(model: nn.Module) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_quantized", False))


def linear_targets(model: nn.Module, names: list[str]) -> list[str]:
    """Full names of the Linear (or 4-bit Linear) modules whose last name part is in `names`.

    In Qwen3-MoE the experts' gate/up/down are 3D parameters, not Linear modules; peft would try
    to wrap them as parameters, which the fused MoE path handles with its own expert LoRA instead.
    """
    import bitsandbytes as bnb

    linear = (nn.Linear, bnb.nn.Linear4bit)
    found = [n for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in names and isinstance(m, linear)]
    if not found:
        raise ValueError(f"no Linear module named any of {names} in {type(model).__name__}")
    return found


def freeze_decoder(model: nn.Module, gradient_checkpointing: bool = False) -> nn.Module:
    """Stage 1: no decoder weight trains; gradients still flow through it to the projector."""
    model.requires_grad_(False)
    if gradient_checkpointing:
        # non-reentrant checkpointing works when only the inputs_embeds require grad
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def add_lora(
    model: nn.Module, lora_cfg: Mapping[str, Any], gradient_checkpointing: bool = False
) -> PeftModel:
    """Stage 2: LoRA on q/k/v/o/gate/up/down on top of `prepare_model_for_kbit_training`."""
    if is_quantized(model):
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    else:
        freeze_decoder(model, gradient_checkpointing)
    config = LoraConfig(
        r=int(lora_cfg["r"]),
        lora_alpha=int(lora_cfg["alpha"]),
        lora_dropout=float(lora_cfg.get("dropout", 0.0)),
        target_modules=linear_targets(model, list(lora_cfg.get("target_modules") or DEFAULT_TARGETS)),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)
