"""The one LoRA policy: which parts of a decoder get adapters, how they are built, saved and loaded.

Training, the planner and the exporter all ask this module, so they cannot drift apart.
- Dense Qwen3: every Linear (bitsandbytes `Linear4bit` included) whose name is in `target_modules`
  (q/k/v/o/gate/up/down by default) gets a peft LoRA (with `lora.dropout`).
- Qwen3-MoE: attention the same way. The routed experts are 3D tensors, not Linear modules, so peft's
  name matching must never reach them; instead, with `model.moe_kernel: fused`, every layer's
  `FusedMoeExperts` gets an `ExpertLoRA` (same r and alpha, no dropout: see `vlm.moe.lora`) on
  `gate_up_proj` when `target_modules` names gate_proj and up_proj (one fused tensor: both or neither)
  and on `down_proj` when it names down_proj. With `moe_kernel: eager` the experts stay frozen
  (attention-only LoRA, logged): peft could only adapt them through `target_parameters`, which
  materializes a full expert-sized delta per forward and refuses dropout.
- On disk (`vlm.export`), the expert adapters are stock peft's `target_parameters` layout next to the
  attention LoRA in one folder; `load_adapter` puts such a folder back onto a fused decoder.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training, set_peft_model_state_dict
from torch import nn

from vlm.config.schema import LoraConfig
from vlm.util.errors import UsageError

log = logging.getLogger(__name__)
EXPERT_NAMES = {"gate_proj": "gate_up_proj", "up_proj": "gate_up_proj", "down_proj": "down_proj"}


@dataclass(frozen=True)
class LoraTargets:
    modules: tuple[str, ...]  # full names of the Linear modules peft wraps
    experts: tuple[str, ...] = ()  # full names of the FusedMoeExperts modules that get an ExpertLoRA
    expert_parts: tuple[str, ...] = ()  # which of their tensors: ("gate_up_proj", "down_proj") or a part


def _linear_types() -> tuple[type, ...]:
    import bitsandbytes as bnb

    return (nn.Linear, bnb.nn.Linear4bit)


def expert_parts(names: set[str]) -> tuple[str, ...]:
    """The experts' tensors that `target_modules` names (gate and up are one fused tensor)."""
    if ("gate_proj" in names) != ("up_proj" in names):
        one = "gate_proj" if "gate_proj" in names else "up_proj"
        raise UsageError(
            f"train.lora.target_modules names {one} alone: Qwen3-MoE experts fuse gate_proj and up_proj "
            "into one gate_up_proj tensor, so name both or neither"
        )
    return tuple(
        p
        for p in ("gate_up_proj", "down_proj")
        if p in {EXPERT_NAMES[n] for n in names & EXPERT_NAMES.keys()}
    )


def lora_targets(decoder: nn.Module, lora: LoraConfig) -> LoraTargets:
    """The decoder's parts that `lora.target_modules` names, as the policy above maps them."""
    from vlm.moe import FusedMoeExperts
    from vlm.moe.integrate import is_dense_experts

    names = set(lora.target_modules)
    linear = _linear_types()
    modules = tuple(
        n for n, m in decoder.named_modules() if n.rsplit(".", 1)[-1] in names and isinstance(m, linear)
    )
    if not modules:
        raise UsageError(
            f"train.lora.target_modules={sorted(names)}: no Linear module of the decoder has such a name"
        )
    fused = tuple(n for n, m in decoder.named_modules() if isinstance(m, FusedMoeExperts))
    parts = expert_parts(names) if fused or any(is_dense_experts(m) for m in decoder.modules()) else ()
    if parts and not fused:
        log.warning(
            "model.moe_kernel=eager: the routed experts get no LoRA (only moe_kernel=fused adapts them); "
            "training attention-only LoRA"
        )
    return LoraTargets(modules, fused if parts else (), parts if fused else ())


def peft_config(
    targets: LoraTargets, lora: LoraConfig, with_experts: bool = False, **extra: object
) -> PeftLoraConfig:
    """peft's config for exactly these targets (full names: no accidental matches).

    with_experts: also name the expert tensors as peft `target_parameters` (the saved adapter's config;
    in training they are ExpertLoRA modules, not peft's). peft's `ParamWrapper` refuses dropout, and
    the config has one dropout for all targets, so such a config records 0: dropout is a training-time
    regularizer, inference is identical without it."""
    params = [f"{m}.{p}" for m in targets.experts for p in targets.expert_parts] if with_experts else []
    return PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=0.0 if params else lora.dropout,
        target_modules=list(targets.modules),
        target_parameters=params or None,
        bias="none",
        task_type="CAUSAL_LM",
        **extra,
    )


def attach_expert_lora(decoder: nn.Module, targets: LoraTargets, lora: LoraConfig) -> int:
    """A fresh ExpertLoRA (r, alpha of `lora`) on every targeted experts module; returns its parameters."""
    n = 0
    for name in targets.experts:
        n += decoder.get_submodule(name).add_lora(lora.r, lora.alpha, targets.expert_parts).num_parameters()
    return n


def attach_lora(decoder: nn.Module, lora: LoraConfig) -> PeftModel:
    """Wrap the policy's targets with fresh adapters; only the adapters train."""
    targets = lora_targets(decoder, lora)
    model = get_peft_model(decoder, peft_config(targets, lora))
    # After peft has frozen everything but its own adapters: the expert factors stay trainable.
    attach_expert_lora(model.get_base_model(), targets, lora)
    return model


def load_adapter(decoder: nn.Module, path: str | Path) -> PeftModel:
    """A saved adapter folder on `decoder`, frozen, for inference. A stock peft adapter on a decoder with
    fused experts: peft takes the Linear targets, `ExpertLoRA` the `target_parameters` (peft's 3D layout,
    converted by `vlm.moe.adapter_format`); everything else goes through `PeftModel.from_pretrained`."""
    from safetensors.torch import load_file

    from vlm.moe import FusedMoeExperts
    from vlm.moe.adapter_format import from_peft, is_peft_expert_key

    path = Path(path)
    spec = json.loads((path / "adapter_config.json").read_text())
    fused = {n: m for n, m in decoder.named_modules() if isinstance(m, FusedMoeExperts)}
    if not spec.get("target_parameters") or not fused:
        return PeftModel.from_pretrained(decoder, str(path), is_trainable=False)
    cfg = PeftLoraConfig.from_pretrained(str(path))
    experts = sorted({p.rsplit(".", 1)[0] for p in cfg.target_parameters})
    parts = tuple(sorted({p.rsplit(".", 1)[1] for p in cfg.target_parameters}, reverse=True))
    if unknown := [m for m in experts if m not in fused]:
        raise UsageError(
            f"{path}: adapter targets experts {unknown[0]}, which the base decoder does not have"
        )
    weights = load_file(path / "adapter_model.safetensors")
    attention = {k: v for k, v in weights.items() if not is_peft_expert_key(k, experts)}
    cfg.target_parameters, cfg.inference_mode = None, True
    model = get_peft_model(decoder, cfg)
    result = set_peft_model_state_dict(model, attention)
    if result.unexpected_keys:
        raise UsageError(
            f"{path}: adapter weight {result.unexpected_keys[0]} has no place in the base decoder"
        )
    for name in experts:
        lora = fused[name].add_lora(cfg.r, cfg.lora_alpha, parts)
        from_peft(lora, name, weights)
    model.requires_grad_(False)
    return model.eval()


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
    """The decoder as a stage trains it: frozen (lora None), or QLoRA (peft's k-bit preparation + LoRA on
    the policy's targets, routed experts included with moe_kernel=fused)."""
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
    model = attach_lora(decoder, lora)
    n_experts = sum(
        p.numel() for n, p in model.named_parameters() if p.requires_grad and ".experts.lora." in n
    )
    n_all = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("LoRA: %d trainable parameters, %d of them on routed experts", n_all, n_experts)
    return model
