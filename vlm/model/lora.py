"""The one LoRA policy: which parts of a decoder get adapters, and the peft config for them.

Training, the planner and the exporter all ask this module, so they cannot drift apart.
- Dense Qwen3: every Linear (bitsandbytes `Linear4bit` included) whose name is in `target_modules`
  (q/k/v/o/gate/up/down by default) gets a peft LoRA.
- Qwen3-MoE: the same for attention; the routed experts are 3D tensors, not Linear modules, so names
  like `down_proj` must never reach them through peft's name matching (it would wrap them as
  parameters). `lora_targets` only ever returns Linear modules.
"""

from __future__ import annotations

from dataclasses import dataclass

from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
from torch import nn

from vlm.config.schema import LoraConfig


@dataclass(frozen=True)
class LoraTargets:
    modules: tuple[str, ...]  # full names of the Linear modules peft wraps


def _linear_types() -> tuple[type, ...]:
    import bitsandbytes as bnb

    return (nn.Linear, bnb.nn.Linear4bit)


def lora_targets(decoder: nn.Module, lora: LoraConfig) -> LoraTargets:
    """The decoder's parts that `lora.target_modules` names, as the policy above maps them."""
    names = set(lora.target_modules)
    linear = _linear_types()
    modules = tuple(
        n for n, m in decoder.named_modules() if n.rsplit(".", 1)[-1] in names and isinstance(m, linear)
    )
    if not modules:
        raise ValueError(
            f"train.lora.target_modules={sorted(names)}: no Linear module of the decoder has such a name"
        )
    return LoraTargets(modules)


def peft_config(targets: LoraTargets, lora: LoraConfig, **extra: object) -> PeftLoraConfig:
    """peft's config for exactly these targets (full module names: no accidental matches)."""
    return PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(targets.modules),
        bias="none",
        task_type="CAUSAL_LM",
        **extra,
    )


def attach_lora(decoder: nn.Module, lora: LoraConfig) -> PeftModel:
    """Wrap the policy's targets with fresh adapters; only the adapters train."""
    return get_peft_model(decoder, peft_config(lora_targets(decoder, lora), lora))


def is_quantized(model: nn.Module) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_quantized", False))


def freeze_decoder(decoder: nn.Module, gradient_checkpointing: bool) -> nn.Module:
    """Stage 1: no decoder weight trains; gradients still flow through it to the projector."""
    decoder.requires_grad_(False)
    if gradient_checkpointing:
        # non-reentrant checkpointing works when only the inputs_embeds require grad
        decoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return decoder


def prepare_decoder(decoder: nn.Module, lora: LoraConfig | None, gradient_checkpointing: bool) -> nn.Module:
    """The decoder as a stage trains it: frozen (lora None), or QLoRA (peft's k-bit preparation + LoRA)."""
    if lora is None:
        return freeze_decoder(decoder, gradient_checkpointing)
    if is_quantized(decoder):
        decoder = prepare_model_for_kbit_training(
            decoder,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    else:
        freeze_decoder(decoder, gradient_checkpointing)
    return attach_lora(decoder, lora)
