"""Loading an export directory back: `load_exported(DIR)` rebuilds the whole captioner.

The export directory is a boundary: every file vlm.json names must resolve inside it, and only
safetensors and JSON are read (the adapter's files are checked here before peft sees the folder, so
peft's pickle fallback is never reached). `trust_remote_code` is never passed. Before an adapter is put
on a base, the base's architecture, width and depth are checked against vlm.json.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from vlm.config.schema import ArchConfig, ModelConfig, PromptConfig, VisionConfig
from vlm.export.format import ExportError, checked_safetensors, inside, read_export


def check_base(meta: dict[str, Any], base: str, revision: str | None = None) -> None:
    """Refuse a base whose architecture, width or depth differs from the one the adapter was fit to."""
    from transformers import AutoConfig

    want = meta["decoder"]
    try:
        c = AutoConfig.from_pretrained(base, revision=revision)
    except (OSError, ValueError) as e:
        raise ExportError(
            f"base decoder {base}: cannot read its config.json ({str(e).splitlines()[0]})"
        ) from None
    got = {"model_type": c.model_type, "architectures": list(getattr(c, "architectures", None) or [])}
    got |= {k: int(getattr(c, k, -1)) for k in ("hidden_size", "num_hidden_layers")}

    def show(d: dict[str, Any]) -> str:
        cls = (d["architectures"] or [d["model_type"]])[0]
        return f"{cls} (model_type={d['model_type']}, hidden_size={d['hidden_size']}, layers={d['num_hidden_layers']})"

    same_cls = (
        not (want["architectures"] and got["architectures"]) or want["architectures"] == got["architectures"]
    )
    if (
        got["model_type"] != want["model_type"]
        or not same_cls
        or got["hidden_size"] != want["hidden_size"]
        or got["num_hidden_layers"] != want["num_hidden_layers"]
    ):
        raise ExportError(f"adapter was trained on {show(want)} but base {base} is {show(got)}")


def base_model(meta: dict[str, Any], base: str | None, quantize: str | None) -> ModelConfig:
    """The base decoder's ModelConfig: as recorded, at another location (`base`), or the seeded tiny
    model rebuilt from its arch when its cache directory is gone (another machine). A base trained from
    an NF4 checkpoint loads from it (nothing to quantize) while it is there and NF4 is wanted."""
    d = meta["decoder"]
    name = base if base is not None else d["name_or_path"]
    nf4 = d.get("nf4_checkpoint")  # absent in exports written before NF4 checkpoints existed
    if base is None and nf4 and Path(nf4).is_dir() and (quantize or d["quantize"]) == "nf4":
        name = nf4
    elif base is None and d["tiny_seeded"] and not Path(name).is_dir():
        name = None
    return ModelConfig(
        name_or_path=name, revision=d["revision"], tokenizer=None, quantize=quantize or d["quantize"],
        moe_kernel=d["moe_kernel"], init_seed=d["init_seed"], arch=ArchConfig(**d["arch"]),
    )  # fmt: skip


def checked_adapter(root: Path, rel: Any) -> Path:
    """The adapter folder, with its two files present and sound; a pickle is never an alternative."""
    folder = inside(root, rel, "adapter.path")
    config = folder / "adapter_config.json"
    if not config.is_file():
        raise ExportError(f"{config}: adapter.path has no adapter_config.json")
    checked_safetensors(folder / "adapter_model.safetensors", "adapter weights")
    return folder


def load_exported(
    path: str | os.PathLike,
    base: str | None = None,
    quantize: str | None = None,
    compute_dtype: str | None = None,
    merged: bool = False,
    device: str | None = None,
    attn_implementation: str | None = None,
) -> Any:
    """Rebuild the captioner (vision tower, projector, base decoder + adapter, tokenizer, prompt).

    base: another location of the same base decoder (checked against the adapter's architecture).
    quantize: "nf4" | "none"; default: as trained. merged: use `merged/` instead of base + adapter.
    device: e.g. "cuda:0"; default CPU. Returns a `VideoCaptioner` in eval mode (`.meta` is vlm.json).
    """
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from projector import build_projector
    from vlm.model.captioner import VideoCaptioner
    from vlm.model.decoder import DTYPES, decoder_source, load_decoder
    from vlm.model.lora import load_adapter
    from vlm.model.processor import Processor
    from vlm.model.tokenizer import load_tokenizer
    from vlm.model.vision import build_vision
    from vlm.model.vlm import VLM

    root = Path(path).resolve()
    meta = read_export(root)
    d = meta["decoder"]
    dtype = compute_dtype or d["compute_dtype"]
    attn = attn_implementation or d["attn_implementation"]
    device_map = {"": device} if device and device != "cpu" else None
    # Every file this export names is checked before any weight is loaded.
    proj_file = checked_safetensors(
        inside(root, meta["projector"]["weights"], "projector.weights"), "projector weights"
    )
    vis_file = None
    if meta["vision"]["weights"] is not None:
        vis_file = checked_safetensors(
            inside(root, meta["vision"]["weights"], "vision.weights"), "vision weights"
        )
    tok_dir = inside(root, meta["tokenizer"]["path"], "tokenizer.path")
    adapter_dir = checked_adapter(root, meta["adapter"]["path"]) if meta["adapter"] and not merged else None
    if merged:
        if not meta["merged"]:
            raise ExportError(f"{root}: exported without merge=true (no merged/)")
        merged_dir = inside(root, meta["merged"]["path"], "merged.path")
        for f in sorted(merged_dir.glob("*.safetensors")):
            checked_safetensors(f, "merged weights")
        decoder = AutoModelForCausalLM.from_pretrained(
            str(merged_dir),
            dtype=DTYPES[dtype],
            attn_implementation=attn,
            use_safetensors=True,
            device_map=device_map,
        )
    else:
        model = base_model(meta, base, quantize)
        check_base(meta, decoder_source(model), model.revision)
        decoder = load_decoder(model, dtype, attn, device_map=device_map)
        if adapter_dir is not None:  # the LoRA policy's loader: routed-expert LoRA onto fused experts too
            decoder = load_adapter(decoder, adapter_dir)
    decoder.requires_grad_(False)

    vcfg = VisionConfig(**meta["vision"]["config"])
    if vis_file is not None:  # our own copy of the tower: build the architecture, no download
        vcfg = replace(vcfg, weights=str(vis_file), freeze=True)
    else:
        vcfg = replace(vcfg, freeze=True)
    vision = build_vision(vcfg)
    p = meta["projector"]
    proj = build_projector(p["config"], p["in_dim"], p["out_dim"], tuple(p["grid"]))
    proj.load_state_dict(load_file(proj_file), strict=True)
    processor = Processor(
        load_tokenizer(tok_dir), PromptConfig(**meta["prompt"]), meta["tokenizer"]["max_caption_tokens"]
    )
    captioner = VideoCaptioner(VLM(vision, proj, decoder), processor, meta)
    if device and device != "cpu":
        vision.to(device)
        proj.to(device)
    return captioner.eval()
