"""Loading an export directory back: `load_exported(DIR)` rebuilds the whole VLM.

Reads only JSON and safetensors (vlm.json, projector/vision/adapter weights, the base's config.json
and safetensors through transformers and peft); `trust_remote_code` is never passed. Before an
adapter is put on a base, the base's architecture, width and depth are checked against vlm.json.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

FORMAT = "kovicap-export"
FORMAT_VERSION = 1


class ExportError(ValueError):
    """A usage problem (bad checkpoint, occupied output, mismatched base): one line naming the thing."""


def read_export(path: str | os.PathLike) -> dict[str, Any]:
    """vlm.json of an export directory, checked for format and version."""
    p = Path(path) / "vlm.json"
    try:
        meta = json.loads(p.read_text())
    except FileNotFoundError:
        raise ExportError(f"{path}: not a kovicap export (no vlm.json)") from None
    except (OSError, ValueError) as e:
        raise ExportError(f"{p}: unreadable ({e})") from None
    if meta.get("format") != FORMAT or not isinstance(meta.get("format_version"), int):
        raise ExportError(f"{p}: not a kovicap export (format={meta.get('format')!r})")
    if meta["format_version"] > FORMAT_VERSION:
        raise ExportError(
            f"{p}: export format {meta['format_version']} is newer than this code ({FORMAT_VERSION})"
        )
    return meta


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
        cls = (d.get("architectures") or [d["model_type"]])[0]
        return f"{cls} (model_type={d['model_type']}, hidden_size={d['hidden_size']}, layers={d['num_hidden_layers']})"

    same_cls = (
        not (want.get("architectures") and got["architectures"])
        or want["architectures"] == got["architectures"]
    )
    if (
        got["model_type"] != want["model_type"]
        or not same_cls
        or got["hidden_size"] != want["hidden_size"]
        or got["num_hidden_layers"] != want["num_hidden_layers"]
    ):
        raise ExportError(f"adapter was trained on {show(want)} but base {base} is {show(got)}")


def _base_for(meta: dict[str, Any], base: str | None) -> str:
    d = meta["decoder"]
    if base is not None:
        return str(base)
    name = d["name_or_path"]
    if d.get("tiny_seeded") and not Path(name).is_dir():  # another machine: rebuild the seeded base
        from vlm.decoder import tiny_base_dir

        return str(tiny_base_dir({"arch": d["arch"], "init_seed": d.get("init_seed", 0)}))
    return name


def load_exported(
    path: str | os.PathLike,
    base: str | None = None,
    quantize: str | None = None,
    compute_dtype: str | None = None,
    merged: bool = False,
    device: str | None = None,
    attn_implementation: str | None = None,
) -> Any:
    """Rebuild the whole VLM (vision encoder, projector, base decoder + adapter, tokenizer, prompt).

    base: another location of the same base decoder (checked against the adapter's architecture).
    quantize: "nf4" | "none"; default: as trained. merged: use `merged/` instead of base + adapter.
    device: e.g. "cuda:0"; default CPU. Returns a `vlm.model.VLM` in eval mode.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from projector import build_projector
    from vlm.decoder import DTYPES, load_decoder
    from vlm.model import VLM, Prompt
    from vlm.tokenizer import load_tokenizer
    from vlm.vision import build_clip, build_vision

    root = Path(path)
    meta = read_export(root)
    d = meta["decoder"]
    dtype = compute_dtype or d["compute_dtype"]
    attn = attn_implementation or d.get("attn_implementation", "sdpa")
    device_map = {"": device} if device and device != "cpu" else None
    if merged:
        if not meta.get("merged"):
            raise ExportError(f"{root}: exported without merge=true (no merged/)")
        decoder = AutoModelForCausalLM.from_pretrained(
            str(root / "merged"),
            dtype=DTYPES[dtype],
            attn_implementation=attn,
            use_safetensors=True,
            device_map=device_map,
        )
    else:
        src = _base_for(meta, base)
        check_base(meta, src, d.get("revision"))
        decoder = load_decoder(
            {
                "name_or_path": src,
                "revision": d.get("revision"),
                "quantize": quantize or d["quantize"],
                "moe_kernel": d.get("moe_kernel"),
            },
            dtype,
            attn,
            device_map=device_map,
        )
        if meta.get("adapter"):
            decoder = PeftModel.from_pretrained(
                decoder, str(root / meta["adapter"]["path"]), is_trainable=False
            )
    decoder.requires_grad_(False)

    v = dict(meta["vision"])
    clip_cfg = {**v, "weights": None}
    if v.get("weights"):  # our own copy of the tower: build the architecture without any download
        clip_cfg["pretrained"] = None
    clip = build_clip(clip_cfg)
    if v.get("weights"):
        clip.visual.load_state_dict(load_file(root / v["weights"]), strict=True)
    vision = build_vision(clip_cfg, clip=clip)
    p = meta["projector"]
    proj = build_projector(p, p["in_dim"], p["out_dim"], vision.grid)
    proj.load_state_dict(load_file(root / p["weights"]), strict=True)
    tok = load_tokenizer(meta["tokenizer"]["source"])
    model = VLM(
        vision, proj, decoder, tok, Prompt(system=meta["prompt"]["system"], user=meta["prompt"]["user"])
    )
    model.export_meta = meta  # the caller (captioning) records the export id and frame sampling
    if device and device != "cpu":
        model.vision.to(device)
        model.projector.to(device)
    return model.eval()


def vlm_from_checkpoint(checkpoint: str | os.PathLike, *overrides: str) -> Any:
    """The VLM exactly as training built it (config from the checkpoint) with its trained weights;
    `overrides` are Hydra-style `key=value` strings (e.g. model.quantize=none). For tests and checks."""
    from omegaconf import OmegaConf

    from vlm.build import build_vlm
    from vlm.checkpoint import load_dir

    ck = load_dir(checkpoint)
    cfg = OmegaConf.create(ck["kovicap"]["config"])
    cfg.merge_with_dotlist(list(overrides))
    model = build_vlm(cfg)
    state = {k[len("vlm.") :]: v for k, v in ck["state_dict"].items()}
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    if sorted(state) != sorted(trained):
        odd = sorted(set(state) ^ trained)
        raise ExportError(
            f"{checkpoint}: trained weights do not match the model built from its config, e.g. {odd[0]}"
        )
    model.load_state_dict(state, strict=False)
    return model.eval()
