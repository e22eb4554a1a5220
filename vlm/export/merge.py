"""Merging a LoRA adapter into a de-quantized copy of its (4-bit) base: a plain transformers model."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file

from vlm.config.schema import ModelConfig
from vlm.export.format import ExportError
from vlm.model.decoder import load_decoder


def _dequantized(module: torch.nn.Module) -> torch.Tensor:
    """fp32 weight of a bitsandbytes Linear4bit, exactly as its fp32 training-time matmul sees it."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    w = module.weight
    if getattr(w.quant_state, "packing_format_for_cpu", False):  # CPU inference repacks on first use
        w.data, w.quant_state = _convert_weight_packed_for_cpu_inverse(w.data, w.quant_state)
    return bnb.functional.dequantize_4bit(w.data, w.quant_state).float()


def merge_decoder(
    model: ModelConfig, base: str, adapter: Path | None, out: Path, dtype: str = "bfloat16"
) -> None:
    """Write base + LoRA as one plain transformers model: each 4-bit weight is de-quantized to fp32
    (the weights training actually fit the adapter to), W + (alpha/r)·B·A is formed in fp32, then
    cast to `dtype`. The 4-bit tensors themselves are never modified."""
    import bitsandbytes as bnb

    model = load_decoder(replace(model, name_or_path=base, moe_kernel="eager"), "float32")
    lora, scale = {}, 0.0
    if adapter is not None:
        spec = json.loads((adapter / "adapter_config.json").read_text())
        if spec.get("use_dora") or spec.get("use_rslora"):
            raise ExportError(f"{adapter}: DoRA/rsLoRA adapters are not supported by merge")
        lora, scale = load_file(adapter / "adapter_model.safetensors"), spec["lora_alpha"] / spec["r"]
    target = getattr(torch, dtype)
    used = 0
    for name, mod in list(model.named_modules()):
        is4 = isinstance(mod, bnb.nn.Linear4bit)
        if not (is4 or isinstance(mod, torch.nn.Linear)):
            continue
        a = lora.get(f"base_model.model.{name}.lora_A.weight")  # (r, in)
        b = lora.get(f"base_model.model.{name}.lora_B.weight")  # (out, r)
        if not is4 and a is None:
            continue
        w = _dequantized(mod) if is4 else mod.weight.detach().float()  # (out, in)
        if a is not None:
            w = w + scale * (b.float() @ a.float())
            used += 2
        new = torch.nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None, dtype=target)
        new.weight.data.copy_(w)
        if mod.bias is not None:
            new.bias.data.copy_(mod.bias.detach())
        model.set_submodule(name, new)
    if used != len(lora):
        raise ExportError(f"{adapter}: {len(lora) - used} LoRA tensors found no module in base {base}")
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)  # a plain model from here on
    model.to(target)
    model.config.dtype = target
    model.save_pretrained(str(out), safe_serialization=True)
