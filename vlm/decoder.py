"""The Qwen3 decoder: architecture from config, meta-device builds, and loading (NF4 4-bit or not).

Real tiers load a hub id or local directory with `from_pretrained`. Tiny configs (`name_or_path:
null`) build a seeded random model of the same class, save it once to a cache directory and then
load it through the very same `from_pretrained` call, so tests and the demo exercise the real path
(quantization included).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
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

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def as_dict(cfg: Any) -> dict[str, Any]:
    """A plain dict from an OmegaConf node or mapping (so this module needs no Hydra)."""
    if cfg is None:
        return {}
    if hasattr(cfg, "_metadata"):  # omegaconf DictConfig without importing omegaconf here
        from omegaconf import OmegaConf

        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    return dict(cfg)


def arch_config(model_cfg: Mapping[str, Any]) -> PretrainedConfig:
    """The transformers config described by a model YAML's `arch` block."""
    arch = dict(as_dict(model_cfg)["arch"])
    model_type = arch.pop("model_type")
    return AutoConfig.for_model(model_type, **arch)


def build_on_meta(model_cfg: Mapping[str, Any]) -> PreTrainedModel:
    """The full architecture with no storage: parameter counts and shapes without a download."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(arch_config(model_cfg))


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    """(total, active per token) parameters; for MoE only top-k of the experts are active."""
    total = sum(p.numel() for p in model.parameters())
    cfg = getattr(model, "config", None)
    n_exp = getattr(cfg, "num_experts", None)
    if not n_exp:
        return total, total
    expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    return total, total - expert + expert * cfg.num_experts_per_tok // n_exp


def cache_root() -> Path:
    return Path(os.environ.get("KOVICAP_CACHE", Path.home() / ".cache" / "kovicap"))


def tiny_base_dir(model_cfg: Mapping[str, Any]) -> Path:
    """Directory holding the seeded random model for a tiny config, created on first use."""
    cfg = as_dict(model_cfg)
    key = json.dumps({"arch": cfg["arch"], "seed": cfg.get("init_seed", 0)}, sort_keys=True)
    out = cache_root() / "tiny" / hashlib.sha256(key.encode()).hexdigest()[:16]
    if (out / "config.json").exists():
        return out
    torch.manual_seed(cfg.get("init_seed", 0))
    model = AutoModelForCausalLM.from_config(arch_config(cfg), dtype=torch.float32)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-"))
    model.save_pretrained(tmp)
    try:
        tmp.rename(out)  # atomic: a concurrent builder either wins or finds ours
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def quantization_config(
    model_cfg: Mapping[str, Any], compute_dtype: torch.dtype
) -> BitsAndBytesConfig | None:
    quantize = as_dict(model_cfg).get("quantize", "none")
    if quantize in (None, "none", False):
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
    model_cfg: Mapping[str, Any],
    compute_dtype: torch.dtype | str = torch.float32,
    attn_implementation: str = "sdpa",
    device_map: str | dict | None = None,
) -> PreTrainedModel:
    """Load the configured decoder (4-bit when `quantize: nf4`), ready for LoRA or inference."""
    cfg = as_dict(model_cfg)
    dtype = DTYPES[compute_dtype] if isinstance(compute_dtype, str) else compute_dtype
    source = cfg.get("name_or_path") or tiny_base_dir(cfg)
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": attn_implementation}
    if cfg.get("revision") and cfg.get("name_or_path"):
        kwargs["revision"] = cfg["revision"]
    qcfg = quantization_config(cfg, dtype)
    if qcfg is not None:
        kwargs["quantization_config"] = qcfg
    if device_map is not None:
        kwargs["device_map"] = device_map
    model = AutoModelForCausalLM.from_pretrained(str(source), **kwargs)
    if getattr(model.config, "num_experts", None) and cfg.get("moe_kernel") == "fused":
        from vlm.moe import use_fused_moe  # NF4 experts + grouped kernels (bitsandbytes skips 3D params)

        use_fused_moe(model)
    return model
