"""Export a training checkpoint to a portable directory, and load it back.

    python -m vlm.export checkpoint=outputs/train/stage2_lora/checkpoints/last out=outputs/export
    python -m vlm.export checkpoint=... out=... merge=true overwrite=true

The export directory holds only safetensors, JSON and markdown:

    adapter/adapter_config.json, adapter/adapter_model.safetensors   a stock PEFT LoRA adapter
    projector.safetensors                                            the trained projector
    vision.safetensors        only when the encoder is not a hub tag (random tiny or local weights)
    vlm.json                  everything needed to rebuild the VLM (see `export`); format version
    README.md                 the model card
    merged/                   with merge=true: LoRA merged into a de-quantized copy of the base

The adapter's `base_model_name_or_path` names the real base (hub id, or the local directory the
training loaded), not the 4-bit copy in memory: LoRA deltas are added to whatever base loads them,
so `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), DIR/adapter)` works as is.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from vlm.checkpoint import publish_dir
from vlm.export_card import model_card
from vlm.export_load import (
    FORMAT,
    FORMAT_VERSION,
    ExportError,
    load_exported,
    read_export,
    vlm_from_checkpoint,
)
from vlm.export_merge import merge_decoder

log = logging.getLogger(__name__)

__all__ = [
    "ExportError",
    "export",
    "load_exported",
    "merge_decoder",
    "read_export",
    "run",
    "vlm_from_checkpoint",
]

ALLOWED_SUFFIXES = (".safetensors", ".json", ".md")  # what an export may contain (no pickle)
LORA_PREFIX = "vlm.decoder."
PROJ_PREFIX = "vlm.projector."


# -- reading a training checkpoint ------------------------------------------------------------------
def _split_state(state: dict[str, torch.Tensor], where: Path) -> tuple[dict, dict]:
    """Checkpoint weights → (projector state, PEFT adapter state with peft's saved key names)."""
    proj, lora = {}, {}
    for k, v in state.items():
        if k.startswith(PROJ_PREFIX):
            proj[k[len(PROJ_PREFIX) :]] = v
        elif k.startswith(LORA_PREFIX) and ".lora_" in k and ".default." in k:
            # peft saves without the adapter name: ...q_proj.lora_A.default.weight → ...q_proj.lora_A.weight
            lora[k[len(LORA_PREFIX) :].replace(".default.", ".")] = v
        else:
            raise ExportError(
                f"{where}: trained weight {k} is neither projector nor peft LoRA; cannot export it"
            )
    if not proj:
        raise ExportError(f"{where}: checkpoint has no projector weights")
    return proj, lora


def base_source(model_cfg: dict[str, Any]) -> str:
    """The base decoder as a loader would name it: hub id, or an absolute local directory."""
    from vlm.decoder import tiny_base_dir

    name = model_cfg.get("name_or_path")
    if not name:
        return str(tiny_base_dir(model_cfg))  # the seeded random base the tiny config trains on
    return str(Path(name).resolve()) if Path(name).is_dir() else str(name)


def _vision_state(vision_cfg: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    """The visual tower's weights when a hub tag cannot rebuild them (random tiny or local weights)."""
    if vision_cfg.get("arch") and not vision_cfg.get("weights"):
        return None
    if vision_cfg.get("weights"):
        full = load_file(vision_cfg["weights"])
        return {k[len("visual.") :]: v for k, v in full.items() if k.startswith("visual.")}
    from vlm.vision import build_clip

    return {k: v.detach().clone() for k, v in build_clip(vision_cfg).visual.state_dict().items()}


def _sha(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _prepare_out(out: Path, overwrite: bool) -> Path:
    """A fresh temporary sibling of `out` to write into (renamed over `out` at the end)."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"{out}: directory is not empty; pass overwrite=true to replace it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
        tmp.mkdir()
    except OSError as e:
        raise ExportError(f"{out}: cannot write there ({e.strerror})") from None
    return tmp


# -- export -------------------------------------------------------------------------------------------
def export(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    merge: bool = False,
    overwrite: bool = False,
    merge_dtype: str = "bfloat16",
    metrics: dict[str, Any] | str | os.PathLike | None = None,
) -> Path:
    """Write the export of training checkpoint `checkpoint` to directory `out`; returns `out`.

    merge: also write `merged/` (plain transformers model, `merge_dtype` weights).
    metrics: a dict or a JSON report whose top-level numbers go into vlm.json and the model card.
    """
    from peft import LoraConfig

    from vlm.checkpoint import load_dir

    ckpt_path, out = Path(checkpoint), Path(out)
    if not (ckpt_path / "state.json").is_file() or not (ckpt_path / "tensors.safetensors").is_file():
        raise ExportError(
            f"{ckpt_path}: not a kovicap checkpoint directory (needs state.json + tensors.safetensors)"
        )
    if merge_dtype not in ("bfloat16", "float16", "float32"):
        raise ExportError(f"merge_dtype={merge_dtype!r}: expected bfloat16, float16 or float32")
    ck = load_dir(ckpt_path)
    cfg = (ck.get("kovicap") or {}).get("config")
    if not cfg:
        raise ExportError(f"{ckpt_path}: checkpoint carries no run config (kovicap.config)")
    proj_state, lora_state = _split_state(ck["state_dict"], ckpt_path)
    metrics = _read_metrics(metrics)
    tmp = _prepare_out(out, overwrite)
    try:
        model_cfg, tc = cfg["model"], cfg["train"]
        base = base_source(model_cfg)
        arch = _arch_facts(base, model_cfg)
        adapter = None
        if lora_state:
            lc = tc["lora_cfg"]
            # the exact modules training wrapped (full names, as vlm.lora does): never a 3D MoE expert
            # parameter that a short name like "down_proj" could also reach
            modules = sorted({k[len("base_model.model.") :].split(".lora_")[0] for k in lora_state})
            lcfg = LoraConfig(
                r=int(lc["r"]),
                lora_alpha=int(lc["alpha"]),
                lora_dropout=float(lc.get("dropout", 0.0)),
                target_modules=modules,
                bias="none",
                task_type="CAUSAL_LM",
                base_model_name_or_path=base,
                revision=model_cfg.get("revision"),
                inference_mode=True,
            )
            (tmp / "adapter").mkdir()
            lcfg.save_pretrained(str(tmp / "adapter"))  # peft's own adapter_config.json
            save_file(lora_state, tmp / "adapter" / "adapter_model.safetensors", metadata={"format": "pt"})
            adapter = {
                "path": "adapter",
                "r": lcfg.r,
                "lora_alpha": lcfg.lora_alpha,
                "target_modules": sorted({m.rsplit(".", 1)[1] for m in modules}),  # short names, for people
            }
        save_file(proj_state, tmp / "projector.safetensors", metadata={"format": "pt"})
        vis_state = _vision_state(cfg["vision"])
        if vis_state is not None:
            save_file(vis_state, tmp / "vision.safetensors", metadata={"format": "pt"})
        meta = _metadata(cfg, ck, ckpt_path, base, arch, adapter, proj_state, vis_state is not None, metrics)
        if merge:
            merge_decoder(model_cfg, base, tmp / "adapter" if adapter else None, tmp / "merged", merge_dtype)
            meta["merged"] = {"path": "merged", "dtype": merge_dtype}
        weights = sorted(p for p in tmp.rglob("*.safetensors") if "merged" not in p.parts)
        digest = hashlib.sha256((_sha(weights) + base + str(model_cfg.get("revision"))).encode()).hexdigest()
        meta["id"] = f"kovicap-{digest[:12]}"
        (tmp / "vlm.json").write_text(json.dumps(meta, ensure_ascii=False, indent=2) + "\n")
        (tmp / "README.md").write_text(model_card(meta))
        stray = [p for p in tmp.rglob("*") if p.is_file() and p.suffix not in ALLOWED_SUFFIXES]
        if stray:  # e.g. a library that started writing a README.txt or a pickle
            raise RuntimeError(f"export would contain {stray[0].name}; only {ALLOWED_SUFFIXES} are allowed")
        publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s → %s (%s)", ckpt_path, out, meta["id"])
    return out


def _read_metrics(metrics: dict[str, Any] | str | os.PathLike | None) -> dict[str, float]:
    if metrics is None:
        return {}
    if not isinstance(metrics, dict):
        try:
            metrics = json.loads(Path(metrics).read_text())
        except (OSError, ValueError) as e:
            raise ExportError(f"metrics={metrics}: cannot read a JSON report ({e})") from None
    return {
        k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def _arch_facts(base: str, model_cfg: dict[str, Any]) -> dict[str, Any]:
    """What an adapter depends on in its base: class, widths and depth (from the base's config.json)."""
    from transformers import AutoConfig

    try:
        c = AutoConfig.from_pretrained(
            base, revision=model_cfg.get("revision") if model_cfg.get("name_or_path") else None
        )
    except (OSError, ValueError):  # base not reachable here: the config's arch block describes it
        from vlm.decoder import arch_config

        c = arch_config(model_cfg)
    return {
        "model_type": c.model_type,
        "architectures": list(getattr(c, "architectures", None) or []),
        "hidden_size": int(c.hidden_size),
        "num_hidden_layers": int(c.num_hidden_layers),
        "vocab_size": int(c.vocab_size),
    }


def _metadata(
    cfg: dict[str, Any],
    ck: dict[str, Any],
    ckpt_path: Path,
    base: str,
    arch: dict[str, Any],
    adapter: dict[str, Any] | None,
    proj_state: dict[str, torch.Tensor],
    has_vision_weights: bool,
    metrics: dict[str, float],
) -> dict[str, Any]:
    m, v, d, p = cfg["model"], cfg["vision"], cfg["data"], cfg["projector"]
    fc1 = proj_state["fc1.weight"]  # (hidden, Dv)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "decoder": {
            "name_or_path": base,
            "revision": m.get("revision"),
            "tiny_seeded": not m.get(
                "name_or_path"
            ),  # rebuildable from arch + init_seed if the cache is gone
            "init_seed": m.get("init_seed", 0),
            "arch": m.get("arch"),
            "quantize": m.get("quantize", "none"),  # how training loaded it (the adapter was fit to that)
            "moe_kernel": m.get("moe_kernel"),
            "compute_dtype": cfg["gpu"]["compute_dtype"],
            "attn_implementation": cfg["gpu"].get("attn_implementation", "sdpa"),
            **arch,
        },
        "adapter": adapter,
        "vision": {
            **{
                k: v.get(k)
                for k in ("arch", "pretrained", "image_size", "mean", "std", "model_cfg", "init_seed")
            },
            "feature_layer": v.get("feature_layer", -1),
            "weights": "vision.safetensors" if has_vision_weights else None,
            "source_weights": v.get("weights"),
        },
        "frames": {
            "num_frames": int(d["num_frames"]),
            "sample_mode": d["sample_mode"],
            "fps": d.get("fps"),
            "max_frames": d.get("max_frames"),
            "image_size": int(d["image_size"]),
        },
        "projector": {
            **p,
            "weights": "projector.safetensors",
            "in_dim": int(fc1.shape[1]),
            "out_dim": int(proj_state["fc2.weight"].shape[0]),
            "max_frames": int(proj_state["frame_pos"].shape[0]),
        },
        "prompt": dict(cfg["prompt"]),
        "tokenizer": {"source": m.get("tokenizer") or m.get("name_or_path")},  # null: Qwen3's, built offline
        "merged": None,
        "training": {
            "checkpoint": str(ckpt_path.resolve()),
            "stage": cfg["train"].get("stage"),
            "global_step": int(ck.get("global_step", 0)),
            "batch_size": cfg["train"].get("batch_size"),
            "lora": cfg["train"].get("lora_cfg") if adapter else None,
            "data": {"train": d.get("train"), "val": d.get("val")},
            "seed": cfg.get("seed"),
        },
        "metrics": metrics,
    }


# -- CLI ----------------------------------------------------------------------------------------------
def run(cfg: Any) -> Path:
    for key in ("checkpoint", "out"):
        if not cfg.get(key):
            raise ExportError(f"{key}=PATH is required (python -m vlm.export checkpoint=CKPT out=DIR)")
    return export(
        cfg.checkpoint,
        cfg.out,
        merge=bool(cfg.merge),
        overwrite=bool(cfg.overwrite),
        merge_dtype=str(cfg.merge_dtype),
        metrics=cfg.get("metrics"),
    )


def _main() -> None:
    import hydra

    @hydra.main(version_base="1.3", config_path="../conf", config_name="export")
    def main(cfg: Any) -> None:
        logging.getLogger().setLevel(logging.INFO)
        try:
            out = run(cfg)
        except ExportError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        print(f"exported to {out}")

    main()


if __name__ == "__main__":
    _main()
