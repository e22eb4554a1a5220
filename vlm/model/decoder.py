"""The Qwen3 decoder: architecture from config, meta-device builds, and loading (NF4 4-bit or not).

Real tiers load a hub id or local directory with `from_pretrained`. Tiny configs (`name_or_path: null`)
build a seeded random model of the same class, save it once to a cache directory and then load it
through the very same `from_pretrained` call, so tests and the demo exercise the real path
(quantization included).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    BitsAndBytesConfig,
    PretrainedConfig,
    PreTrainedModel,
)

from vlm.config.schema import ArchConfig, ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def arch_config(arch: ArchConfig) -> PretrainedConfig:
    """The transformers config an `arch` block describes (MoE keys only when set)."""
    kw = {k: v for k, v in asdict(arch).items() if v is not None}
    return AutoConfig.for_model(kw.pop("model_type"), **kw)


def build_on_meta(config: ArchConfig | PretrainedConfig) -> PreTrainedModel:
    """The full architecture with no storage: parameter counts and shapes without a download."""
    hf = arch_config(config) if isinstance(config, ArchConfig) else config
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(hf)


def is_moe(config: ArchConfig | PretrainedConfig) -> bool:
    return bool(getattr(config, "num_experts", None))


def cache_root() -> Path:
    return Path(os.environ.get("KOVICAP_CACHE", Path.home() / ".cache" / "kovicap"))


def tiny_base_dir(arch: ArchConfig, init_seed: int) -> Path:
    """Directory holding the seeded random model of `arch`, created on first use."""
    key = json.dumps({"arch": asdict(arch), "seed": init_seed}, sort_keys=True)
    out = cache_root() / "tiny" / hashlib.sha256(key.encode()).hexdigest()[:16]
    if (out / "config.json").exists():
        return out
    torch.manual_seed(init_seed)
    model = AutoModelForCausalLM.from_config(arch_config(arch), dtype=torch.float32)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-"))
    model.save_pretrained(tmp)
    try:
        tmp.rename(out)  # atomic: a concurrent builder either wins or finds ours
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def decoder_source(model: ModelConfig) -> str:
    """Where the weights load from: the hub id / directory, or the seeded random model's directory."""
    return model.name_or_path or str(tiny_base_dir(model.arch, model.init_seed))


def loaded_config(model: ModelConfig) -> PretrainedConfig:
    """The architecture of the model that will actually load: its config.json when `name_or_path` is a
    local directory, else the `arch` block (for a hub id it records that model's config.json; tests
    check it against the published parameter counts)."""
    if model.name_or_path is not None and Path(model.name_or_path).is_dir():
        return AutoConfig.from_pretrained(model.name_or_path)
    return arch_config(model.arch)


def quantization_config(quantize: str, compute_dtype: torch.dtype) -> BitsAndBytesConfig | None:
    if quantize == "none":
        return None
    if quantize != "nf4":
        raise ValueError(f"model.quantize={quantize!r}: expected 'nf4' or 'none'")
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,  # quantize the absmax too: ~0.37 bit/param saved (QLoRA)
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=torch.uint8,
    )


def load_decoder(
    model: ModelConfig,
    compute_dtype: str = "float32",
    attn_implementation: str = "sdpa",
    device_map: str | dict | None = None,
) -> PreTrainedModel:
    """Load the configured decoder (4-bit when `quantize: nf4`), ready for LoRA or inference."""
    dtype = DTYPES[compute_dtype]
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": attn_implementation}
    if model.revision and model.name_or_path:
        kwargs["revision"] = model.revision
    qcfg = quantization_config(model.quantize, dtype)
    if qcfg is not None:
        kwargs["quantization_config"] = qcfg
    if device_map is not None:
        kwargs["device_map"] = device_map
    decoder = AutoModelForCausalLM.from_pretrained(decoder_source(model), **kwargs)
    if is_moe(decoder.config) and model.moe_kernel == "fused":
        from vlm.moe import use_fused_moe  # NF4 experts + grouped kernels (bitsandbytes skips 3D params)

        use_fused_moe(decoder)
    return decoder
