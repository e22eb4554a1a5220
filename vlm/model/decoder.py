"""The Qwen3 decoder: architecture from config, meta-device builds, and loading (NF4 4-bit or not).

Real tiers load a hub id or local directory with `from_pretrained`. Tiny configs (`name_or_path: null`)
build a seeded random model of the same class, save it once to a cache directory and then load it
through the very same `from_pretrained` call, so tests and the demo exercise the real path
(quantization included).

Qwen3-MoE with `moe_kernel: fused` is built with NF4 `FusedMoeExperts` from the start and its experts are
streamed from the shards and quantized a few at a time (`vlm.moe.load`): loading never holds more than
the NF4 model plus one small chunk of 16-bit experts. `save_nf4` writes a loaded NF4 decoder, dense or
MoE, as an NF4 checkpoint (bitsandbytes' serialization for the Linear layers, the experts' NF4 buffers,
safetensors, and `kovicap_nf4.json` naming its source); `load_decoder` recognises such a directory and
loads it without quantizing anything (on a CPU, bitsandbytes quantized 17 M weights/s per thread here,
so ~28 s for each Qwen3-32B layer's 487 M on every load; on a GPU the checkpoint is 4x fewer bytes).
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
from vlm.util.errors import UsageError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
NF4_MARKER = "kovicap_nf4.json"  # written next to config.json by `save_nf4`
NF4_FORMAT = "kovicap-nf4"
NF4_VERSION = 1


def arch_config(arch: ArchConfig) -> PretrainedConfig:
    """The transformers config an `arch` block describes (MoE keys only when set)."""
    kw = {k: v for k, v in asdict(arch).items() if v is not None}
    return AutoConfig.for_model(kw.pop("model_type"), **kw)


def build_on_meta(config: ArchConfig | PretrainedConfig, moe_kernel: str = "eager") -> PreTrainedModel:
    """The full architecture with no storage: parameter counts and shapes without a download.
    moe_kernel="fused": a MoE decoder as `load_decoder` builds it, with `FusedMoeExperts`."""
    hf = arch_config(config) if isinstance(config, ArchConfig) else config
    if moe_kernel == "fused" and is_moe(hf):
        from vlm.moe.load import fused_experts_at_init

        with fused_experts_at_init(streaming=False), torch.device("meta"):
            return AutoModelForCausalLM.from_config(hf)
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


def nf4_checkpoint(source: str) -> dict[str, Any] | None:
    """The `kovicap_nf4.json` of an NF4 checkpoint directory (see `save_nf4`), else None."""
    marker = Path(source) / NF4_MARKER
    if not marker.is_file():
        return None
    meta = json.loads(marker.read_text())
    if meta.get("format") != NF4_FORMAT or meta.get("version") != NF4_VERSION:
        raise UsageError(
            f"{marker}: not a {NF4_FORMAT} v{NF4_VERSION} checkpoint (write it again with save_nf4)"
        )
    return meta


def dense_source(model: ModelConfig) -> tuple[str, str | None]:
    """(hub id or directory, revision) of the 16-bit weights: an NF4 checkpoint names the ones it was made
    from (stock transformers and peft load those; they cannot read our NF4 experts)."""
    src = decoder_source(model)
    meta = nf4_checkpoint(src)
    if meta is not None:
        return meta["source"], meta["revision"]
    return src, model.revision if model.name_or_path else None


def _check_nf4_request(model: ModelConfig, source: str, meta: dict[str, Any], moe: bool) -> None:
    if model.quantize != "nf4":
        raise UsageError(
            f"model.quantize={model.quantize}: {source} is an NF4 checkpoint; for 16-bit weights point "
            f"model.name_or_path at its source {meta['source']}"
        )
    if moe and model.moe_kernel != "fused":
        raise UsageError(
            f"model.moe_kernel={model.moe_kernel}: {source} stores the experts in NF4, which only "
            f"moe_kernel=fused reads; for eager experts point model.name_or_path at {meta['source']}"
        )


def _set_compute_dtype(decoder: PreTrainedModel, dtype: torch.dtype) -> None:
    """A pre-quantized checkpoint loads its 16-bit tensors and bitsandbytes states in the dtype it was
    saved with; give them the compute dtype, so the model equals one quantized on the fly at this dtype
    (bitsandbytes de-quantizes to its state's dtype: code * absmax, rounded once)."""
    import bitsandbytes as bnb

    for m in decoder.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.compute_dtype = dtype
            m.weight.quant_state.dtype = dtype
    for p in decoder.parameters():
        if p.is_floating_point() and not isinstance(p, bnb.nn.Params4bit) and p.dtype != dtype:
            p.data = p.data.to(dtype)
    decoder.config.dtype = dtype


def load_decoder(
    model: ModelConfig,
    compute_dtype: str = "float32",
    attn_implementation: str = "sdpa",
    device_map: str | dict | None = None,
) -> PreTrainedModel:
    """Load the configured decoder (4-bit when `quantize: nf4`), ready for LoRA or inference."""
    dtype = DTYPES[compute_dtype]
    source = decoder_source(model)
    nf4 = nf4_checkpoint(source)
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": attn_implementation}
    if model.revision and model.name_or_path and nf4 is None:
        kwargs["revision"] = model.revision
    qcfg = quantization_config(model.quantize, dtype)
    if qcfg is not None and nf4 is None:  # an NF4 checkpoint carries its own (bitsandbytes reads it)
        kwargs["quantization_config"] = qcfg
    if device_map is not None:
        kwargs["device_map"] = device_map
    config = AutoConfig.from_pretrained(source, revision=kwargs.get("revision"))
    if nf4 is not None:
        _check_nf4_request(model, source, nf4, is_moe(config))
    if not (is_moe(config) and model.moe_kernel == "fused"):
        decoder = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        if nf4 is not None:  # bitsandbytes' serialized 4-bit Linear layers, read as they are
            _set_compute_dtype(decoder, dtype)
        return decoder

    from vlm.moe.load import (
        checkpoint_files,
        fused_experts_at_init,
        stream_experts,
    )

    # NF4 experts from the start: no 16-bit experts module is ever built. The load report then leaves out
    # the buffers the stream fills and the dense tensors it reads (none of either in an NF4 checkpoint):
    # anything it still names is a checkpoint that does not fit.
    with fused_experts_at_init(streaming=nf4 is None):
        decoder, info = AutoModelForCausalLM.from_pretrained(source, output_loading_info=True, **kwargs)
    bad = [*info["missing_keys"], *info["unexpected_keys"], *(m[0] for m in info["mismatched_keys"])]
    if bad:
        raise UsageError(
            f"model.name_or_path={source}: weight {sorted(bad)[0]} does not fit {type(decoder).__name__}"
        )
    if nf4 is None:
        stream_experts(decoder, checkpoint_files(source, kwargs.get("revision")))
    else:
        _set_compute_dtype(decoder, dtype)
    return decoder


def save_nf4(decoder: PreTrainedModel, out: Path, source: str, revision: str | None) -> Path:
    """Write a loaded NF4 decoder (Linear layers in bitsandbytes NF4; a MoE decoder's experts as
    `FusedMoeExperts` buffers; the rest as loaded) to directory `out`, with `kovicap_nf4.json` naming its
    16-bit `source`."""
    from vlm.moe import FusedMoeExperts

    if not getattr(decoder, "is_loaded_in_4bit", False):
        raise UsageError(f"{source}: load it with model.quantize=nf4 before saving an NF4 checkpoint")
    if is_moe(decoder.config) and not any(isinstance(m, FusedMoeExperts) for m in decoder.modules()):
        raise UsageError(
            f"{source}: a Qwen3-MoE decoder has NF4 experts to save only when loaded with moe_kernel=fused"
        )
    decoder.save_pretrained(str(out), safe_serialization=True, max_shard_size="5GB")
    meta = {"format": NF4_FORMAT, "version": NF4_VERSION, "source": source, "revision": revision}
    if is_moe(decoder.config):
        meta["experts"] = (
            "FusedMoeExperts buffers: bitsandbytes NF4 per expert, blocksize 64, double-quantized absmax"
        )
    (out / NF4_MARKER).write_text(json.dumps(meta, indent=2) + "\n")
    return out
