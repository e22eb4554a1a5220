"""The model card (README.md) of an export directory, rendered from its vlm.json."""

from __future__ import annotations

from typing import Any


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def model_card(meta: dict[str, Any]) -> str:
    d, v, t, f = meta["decoder"], meta["vision"], meta["training"], meta["frames"]
    a = meta["adapter"]
    base = d["name_or_path"]
    rev = f" (revision `{d['revision']}`)" if d["revision"] else ""
    vc = v["config"]
    if vc["arch"]:
        vis = f"open_clip `{vc['arch']}` ({vc['type']})" + (
            f", pretrained `{vc['pretrained']}`" if vc["pretrained"] else ""
        )
    else:
        vis = "a tiny random open_clip ViT (seeded)"
    if v["weights"]:
        vis += f"; weights in `{v['weights']}`"
    lines = [
        f"# {meta['id']}: Korean video captioning (kovicap)",
        "",
        "Frozen open_clip vision encoder → MLP projector → Qwen3 decoder with a LoRA adapter. "
        "The decoder writes a Korean caption for sampled video frames.",
        "",
        "## Parts",
        f"- Base decoder: `{base}`{rev}, {(d['architectures'] or [d['model_type']])[0]}, "
        f"hidden size {d['hidden_size']}, {d['num_hidden_layers']} layers; trained in `{d['quantize']}` "
        f"with compute dtype {d['compute_dtype']}.",
        f"- Adapter: LoRA r={a['r']}, alpha={a['lora_alpha']} on {', '.join(a['target_modules'])} (`adapter/`)."
        if a
        else "- Adapter: none (the decoder was frozen; only the projector was trained).",
        f"- Vision encoder: {vis}; {f['num_frames']} frames ({f['sample_mode']}) at {f['image_size']} px.",
        f"- Projector: `{meta['projector']['config']['type']}`, {meta['projector']['in_dim']} → "
        f"{meta['projector']['out_dim']}, settings {meta['projector']['config']} (`projector.safetensors`).",
        f"- Prompt ({meta['prompt']['style']}): system `{meta['prompt']['system']}`, "
        f"user `{meta['prompt']['user']}`.",
        f"- Tokenizer: Qwen3's, in `{meta['tokenizer']['path']}/` (captions cut at "
        f"{meta['tokenizer']['max_caption_tokens']} tokens in training).",
        "",
        "## Training",
        f"- Stage `{t['stage']}`, {t['global_step']} steps of batch {t['batch_size']}, seed {t['seed']}.",
        f"- Data: train `{t['data']['train']}`, validation `{t['data']['val']}`.",
        f"- From checkpoint `{t['checkpoint']}`.",
        "",
        "## Metrics",
    ]
    if meta["metrics"]:
        lines += ["| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {_fmt(x)} |" for k, x in meta["metrics"].items()]
    else:
        lines.append("None recorded at export time (pass `metrics=REPORT.json` to `python -m vlm.export`).")
    lines += [
        "",
        "## Load with this project",
        "```python",
        "import vlm",
        "captioner = vlm.load_exported('THIS_DIR')  # vision + projector + base decoder + adapter + tokenizer",
        "captions = captioner.caption(frames)  # (B, T, H, W, 3) uint8 frames at the tower's size",
        "```",
        "Caption a folder: `python -m vlm.caption input=VIDEOS output=captions.jsonl export=THIS_DIR`.",
        "",
        "## Load the decoder without this project",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        f"base = AutoModelForCausalLM.from_pretrained('{base}')",
        "model = PeftModel.from_pretrained(base, 'THIS_DIR/adapter')",
        "```",
    ]
    if meta["merged"]:
        lines += [
            f"or the merged decoder (LoRA merged into a de-quantized {meta['merged']['dtype']} copy of the base):",
            "```python",
            "model = AutoModelForCausalLM.from_pretrained('THIS_DIR/merged')",
            "```",
        ]
    lines += [
        "Without this project the decoder is text-only: the vision encoder and projector are what turn "
        "frames into the `<|video_pad|>` embeddings.",
        "",
        f"Export format {meta['format']} v{meta['format_version']}; files: safetensors, JSON and this card only.",
        "",
    ]
    return "\n".join(lines)
