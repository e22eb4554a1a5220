"""Write the export of a training checkpoint: what a user loads without this project's training code.

    adapter/adapter_config.json, adapter/adapter_model.safetensors   a stock PEFT LoRA adapter; for a
                                Qwen3-MoE the routed experts' LoRA in peft's `target_parameters` layout
    adapter_vllm/               MoE only: the same adapter with per-expert modules (vLLM's default layout)
    projector.safetensors       the trained projector (rebuilt through the projector registry)
    vision.safetensors          the tower's weights, unless they are a named pretrained tag left frozen
    tokenizer/                  the tokenizer the model was trained with (JSON + chat template)
    vlm.json                    everything needed to rebuild the captioner; format version
    README.md                   the model card
    merged/                     with merge=true: LoRA merged into a de-quantized copy of the base,
                                a complete model directory (config, safetensors, tokenizer)

The adapter's `base_model_name_or_path` names the real base (hub id, or the local directory training
loaded; for an NF4 checkpoint, the 16-bit weights it was made from), not the 4-bit copy in memory, so
`PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), DIR/adapter)` works as is.

`export(SOURCE, OUT, quantize=True)` instead writes the NF4 checkpoint of a Qwen3 or Qwen3-MoE base (hub
id or directory), which `load_decoder` then loads without quantizing (see `vlm.model.decoder.save_nf4`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import AutoConfig

from projector import build_projector
from vlm.config import train_config
from vlm.config.entries import TrainEntry
from vlm.config.schema import ArchConfig, ModelConfig
from vlm.export.card import model_card
from vlm.export.format import ALLOWED_SUFFIXES, FORMAT, FORMAT_VERSION, ExportError
from vlm.model.build import tokenizer_source
from vlm.model.decoder import decoder_source, dense_source, loaded_config, nf4_checkpoint
from vlm.model.lora import LoraTargets, peft_config
from vlm.model.tokenizer import load_tokenizer
from vlm.moe.adapter_format import to_peft, to_vllm
from vlm.train.checkpoint import load_dir
from vlm.util.files import atomic_write, publish_dir, temp_dir_beside

log = logging.getLogger(__name__)

PREFIX = {"projector": "vlm.projector.", "vision": "vlm.vision.", "decoder": "vlm.decoder."}
PEFT_ROOT = "base_model.model."
EXPERT_LORA = ".experts.lora."  # ExpertLoRA factors: ...mlp.experts.lora.gate_up_A (see vlm.moe.lora)


def split_state(state: dict[str, torch.Tensor], where: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Checkpoint weights → {projector, vision, lora, experts} (LoRA under peft's saved names, no adapter
    name; experts: the ExpertLoRA factors under their module path)."""
    out: dict[str, dict[str, torch.Tensor]] = {"projector": {}, "vision": {}, "lora": {}, "experts": {}}
    for k, v in state.items():
        if k.startswith(PREFIX["projector"]):
            out["projector"][k[len(PREFIX["projector"]) :]] = v
        elif k.startswith(PREFIX["vision"]):
            out["vision"][k[len(PREFIX["vision"]) :]] = v
        elif k.startswith(PREFIX["decoder"]) and ".lora_" in k and ".default." in k:
            # peft saves without the adapter name: ...q_proj.lora_A.default.weight → ...q_proj.lora_A.weight
            out["lora"][k[len(PREFIX["decoder"]) :].replace(".default.", ".")] = v
        elif k.startswith(PREFIX["decoder"] + PEFT_ROOT) and EXPERT_LORA in k:
            out["experts"][k[len(PREFIX["decoder"] + PEFT_ROOT) :]] = v
        else:
            raise ExportError(
                f"{where}: trained weight {k} is neither projector, tower, peft nor expert LoRA"
            )
    if not out["projector"]:
        raise ExportError(f"{where}: checkpoint has no projector weights")
    return out


def expert_factors(state: dict[str, torch.Tensor]) -> dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """{experts module: {part: (A (E, r, in), B (E, out, r))}} from `split_state`'s "experts"."""
    out: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    for key in {k.rsplit("_", 1)[0] for k in state}:  # model.layers.0.mlp.experts.lora.gate_up
        module, short = key.split(".lora.")
        out.setdefault(module, {})[f"{short}_proj"] = (state[f"{key}_A"], state[f"{key}_B"])
    return {m: out[m] for m in sorted(out)}


def _write_adapter(folder: Path, tensors: dict[str, torch.Tensor], pcfg: Any) -> None:
    folder.mkdir()
    pcfg.save_pretrained(str(folder))  # peft's own adapter_config.json
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})


def write_adapter(tmp: Path, cfg: TrainEntry, parts: dict[str, dict[str, torch.Tensor]]) -> dict[str, Any]:
    """adapter/ (stock peft: Linear LoRA + experts as `target_parameters`) and, for experts, adapter_vllm/
    (the per-expert layout); returns vlm.json's "adapter" entry."""
    lora = cfg.train.lora
    modules = sorted({k[len(PEFT_ROOT) :].split(".lora_")[0] for k in parts["lora"]})
    experts = expert_factors(parts["experts"])
    expert_parts = tuple(p for p in ("gate_up_proj", "down_proj") if any(p in f for f in experts.values()))
    base, revision = dense_source(cfg.model)
    tensors = dict(parts["lora"])
    for module, factors in experts.items():
        tensors.update(to_peft(module, factors))
    targets = LoraTargets(tuple(modules), tuple(experts), expert_parts)
    pcfg = peft_config(targets, lora, with_experts=True, base_model_name_or_path=base, revision=revision,
                       inference_mode=True)  # fmt: skip
    _write_adapter(tmp / "adapter", tensors, pcfg)
    short = sorted({m.rsplit(".", 1)[1] for m in modules})
    entry: dict[str, Any] = {
        "path": "adapter",
        "r": lora.r,
        "lora_alpha": lora.alpha,
        "target_modules": short,
    }
    if experts:
        # vLLM's default Qwen3-MoE path (and transformers 4.x) name every expert's gate/up/down Linear.
        flat = dict(parts["lora"])
        for module, factors in experts.items():
            flat.update(to_vllm(module, factors))
        per_expert = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}
        names = sorted({*short, *(n for p in expert_parts for n in per_expert[p])})
        _write_adapter(tmp / "adapter_vllm", flat, _vllm_config(pcfg, names))
        entry["target_modules"] = [*short, *(f"experts.{p}" for p in expert_parts)]
        entry["experts"] = {"modules": len(experts), "parts": list(expert_parts), "vllm_path": "adapter_vllm"}
    return entry


def _vllm_config(pcfg: Any, names: list[str]) -> Any:
    """The stock adapter's config, with short module names (every expert's gate/up/down Linear matches)."""
    import copy

    out = copy.deepcopy(pcfg)
    out.target_modules, out.target_parameters = set(names), None
    return out


def base_source(cfg: TrainEntry) -> str:
    """The base decoder as a loader would name it: hub id, or an absolute local directory."""
    src = decoder_source(cfg.model)
    return str(Path(src).resolve()) if Path(src).is_dir() else src


def _prepare_output(out: Path, overwrite: bool) -> Path:
    if out.exists() and not out.is_dir():
        raise ExportError(f"output={out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"output={out}: directory is not empty; pass overwrite=true to replace it")
    try:
        return temp_dir_beside(out)
    except OSError as e:
        raise ExportError(f"output={out}: cannot write there ({e.strerror})") from None


def _sha(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _tower_state(cfg: TrainEntry, trained: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """The tower's weights when a pretrained tag alone cannot rebuild them (random, local or trained)."""
    if trained:
        return {k[len("visual.") :]: v for k, v in trained.items() if k.startswith("visual.")}
    if cfg.vision.pretrained is not None and cfg.vision.weights is None:
        return None
    from vlm.model.vision import build_vision

    return {
        k: v.detach().clone().contiguous() for k, v in build_vision(cfg.vision).visual.state_dict().items()
    }


def export(
    checkpoint: str | os.PathLike,
    output: str | os.PathLike,
    merge: bool = False,
    overwrite: bool = False,
    merge_dtype: str = "bfloat16",
    metrics: dict[str, Any] | None = None,
    quantize: bool = False,
) -> Path:
    """Write the export of training checkpoint `checkpoint` to directory `output`; returns `output`.
    quantize=True: `checkpoint` is a base decoder (dense or Qwen3-MoE) instead, saved as an NF4 checkpoint."""
    from vlm.model.vision import build_vision_on_meta

    if quantize:
        return save_nf4_base(str(checkpoint), output, overwrite=overwrite)
    ckpt_path, out = Path(checkpoint), Path(output)
    if merge_dtype not in ("bfloat16", "float16", "float32"):
        raise ExportError(f"merge_dtype={merge_dtype!r}: expected bfloat16, float16 or float32")
    ck = load_dir(ckpt_path)  # CheckpointError (a UsageError) names a missing or damaged file
    if "kovicap" not in ck:
        raise ExportError(f"checkpoint={ckpt_path}: not a kovicap training checkpoint (no run config inside)")
    cfg = train_config(ck["kovicap"]["config"])
    parts = split_state(ck["state_dict"], ckpt_path)
    tmp = _prepare_output(out, overwrite)
    try:
        base = base_source(cfg)
        # the base's own config.json when it is a directory (its `architectures` go into vlm.json)
        hf = AutoConfig.from_pretrained(base) if Path(base).is_dir() else loaded_config(cfg.model)
        tower = build_vision_on_meta(cfg.vision)
        proj = build_projector(cfg.projector, tower.width, hf.hidden_size, tower.grid)
        proj.load_state_dict(parts["projector"], strict=True)
        save_file(parts["projector"], tmp / "projector.safetensors", metadata={"format": "pt"})
        vis_state = _tower_state(cfg, parts["vision"])
        if vis_state is not None:
            save_file(vis_state, tmp / "vision.safetensors", metadata={"format": "pt"})
        adapter = write_adapter(tmp, cfg, parts) if parts["lora"] or parts["experts"] else None
        load_tokenizer(tokenizer_source(cfg.model)).save_pretrained(str(tmp / "tokenizer"))
        dense, revision = dense_source(cfg.model)  # an NF4 checkpoint names its 16-bit source
        meta = _metadata(
            cfg, ck, ckpt_path, dense, hf, adapter, proj.metadata(), vis_state is not None, metrics or {}
        )
        meta["decoder"]["revision"] = revision
        meta["decoder"]["nf4_checkpoint"] = base if nf4_checkpoint(base) is not None else None
        if merge:
            from vlm.export.merge import merge_decoder

            merge_decoder(cfg.model, base, tmp / "adapter" if adapter else None, tmp / "merged", merge_dtype)
            load_tokenizer(tokenizer_source(cfg.model)).save_pretrained(str(tmp / "merged"))
            meta["merged"] = {"path": "merged", "dtype": merge_dtype}
        weights = sorted(p for p in tmp.rglob("*.safetensors") if "merged" not in p.parts)
        digest = hashlib.sha256((_sha(weights) + base + str(cfg.model.revision)).encode()).hexdigest()
        meta["id"] = f"kovicap-{digest[:12]}"
        atomic_write(tmp / "vlm.json", json.dumps(meta, ensure_ascii=False, indent=2) + "\n")
        atomic_write(tmp / "README.md", model_card(meta))
        stray = [p for p in tmp.rglob("*") if p.is_file() and p.suffix not in ALLOWED_SUFFIXES]
        if stray:  # e.g. a library that started writing a README.txt or a pickle
            raise RuntimeError(f"export would contain {stray[0].name}; only {ALLOWED_SUFFIXES} are allowed")
        publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s → %s (%s)", ckpt_path, out, meta["id"])
    return out


def save_nf4_base(
    source: str, output: str | os.PathLike, overwrite: bool = False, device: str | None = None
) -> Path:
    """Load a Qwen3 or Qwen3-MoE base (hub id or directory) straight into NF4 (a MoE's experts streamed)
    and write it to `output` as an NF4 checkpoint plus its tokenizer. Non-quantized tensors keep the source's dtype.
    device: where to quantize (e.g. "cuda:0", much faster than the CPU default)."""
    from vlm.model.decoder import load_decoder, save_nf4

    out = Path(output)
    try:
        hf = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise ExportError(
            f"checkpoint={source}: not a decoder to quantize ({str(e).splitlines()[0]})"
        ) from None
    if hf.model_type not in ("qwen3", "qwen3_moe"):
        raise ExportError(f"checkpoint={source}: quantize=true saves Qwen3 decoders; this is {hf.model_type}")
    if nf4_checkpoint(source) is not None:
        raise ExportError(f"checkpoint={source}: already an NF4 checkpoint")
    dtype = str(getattr(hf, "dtype", None) or "bfloat16").removeprefix("torch.")
    model = ModelConfig(name_or_path=source, revision=None, tokenizer=None, quantize="nf4",
                        moe_kernel="fused", init_seed=0, arch=ArchConfig())  # fmt: skip
    tmp = _prepare_output(out, overwrite)
    try:
        dtype = dtype if dtype in ("bfloat16", "float16", "float32") else "bfloat16"
        decoder = load_decoder(model, dtype, device_map={"": device} if device else None)
        source = str(Path(source).resolve()) if Path(source).is_dir() else source
        save_nf4(decoder, tmp, source, None)
        del decoder
        load_tokenizer(tokenizer_source(model)).save_pretrained(str(tmp))
        publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("saved NF4 checkpoint of %s → %s", source, out)
    return out


def _metadata(
    cfg: TrainEntry, ck: dict[str, Any], ckpt_path: Path, base: str, hf: Any, adapter: dict[str, Any] | None,
    projector: dict[str, Any], has_vision_weights: bool, metrics: dict[str, float],
) -> dict[str, Any]:  # fmt: skip
    m, d = cfg.model, cfg.data
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "decoder": {
            "name_or_path": base,
            "revision": m.revision if m.name_or_path else None,
            "tiny_seeded": m.name_or_path is None,  # rebuildable from arch + init_seed if the cache is gone
            "init_seed": m.init_seed,
            "arch": asdict(m.arch),
            "quantize": m.quantize,  # how training loaded it (the adapter was fit to that)
            "moe_kernel": m.moe_kernel,
            "compute_dtype": cfg.gpu.compute_dtype,
            "attn_implementation": cfg.gpu.attn_implementation,
            "model_type": hf.model_type,
            "architectures": list(getattr(hf, "architectures", None) or []),
            "hidden_size": int(hf.hidden_size),
            "num_hidden_layers": int(hf.num_hidden_layers),
            "vocab_size": int(hf.vocab_size),
        },
        "adapter": adapter,
        "vision": {
            "config": asdict(cfg.vision),
            "weights": "vision.safetensors" if has_vision_weights else None,
        },
        "frames": {
            "num_frames": d.num_frames,
            "sample_mode": d.sample_mode,
            "fps": d.fps,
            "max_frames": d.max_frames,
            "image_size": d.image_size,
        },
        "projector": {**projector, "weights": "projector.safetensors"},
        "prompt": asdict(cfg.prompt),
        "tokenizer": {"path": "tokenizer", "max_caption_tokens": d.max_caption_tokens},
        "merged": None,
        "training": {
            "checkpoint": str(ckpt_path.resolve()),
            "stage": cfg.train.stage,
            "global_step": int(ck["global_step"]),
            "batch_size": cfg.train.batch_size,
            "lora": asdict(cfg.train.lora) if adapter else None,
            "data": {"train": d.train, "val": d.val},
            "seed": cfg.seed,
        },
        "metrics": metrics,
    }
