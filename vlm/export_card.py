"""The model card (README.md) of an export directory, rendered from its vlm.json."""

from __future__ import annotations

from typing import Any


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def model_card(meta: dict[str, Any]) -> str:
    d, v, t, f = meta["decoder"], meta["vision"], meta["training"], meta["frames"]
    a = meta.get("adapter")
    base = d["name_or_path"]
    rev = f" (revision `{d['revision']}`)" if d.get("revision") else ""
    if v.get("arch"):
        vis = f"open_clip `{v['arch']}`" + (
            f", pretrained `{v['pretrained']}`" if v.get("pretrained") else ""
        )
    else:
        vis = "a tiny random open_clip ViT (seeded)"
    if v.get("weights"):
        vis += f"; weights in `{v['weights']}`"
    lines = [
        f"# {meta['id']}: Korean video captioning (kovicap)",
        "",
        "Frozen open_clip vision encoder → MLP projector → Qwen3 decoder with a LoRA adapter. "
        "The decoder writes a Korean caption for sampled video frames.",
        "",
        "## Parts",
        f"- Base decoder: `{base}`{rev}, {(d.get('architectures') or [d['model_type']])[0]}, "
        f"hidden size {d['hidden_size']}, {d['num_hidden_layers']} layers; trained in `{d['quantize']}` "
        f"with compute dtype {d['compute_dtype']}.",
        f"- Adapter: LoRA r={a['r']}, alpha={a['lora_alpha']} on {', '.join(a['target_modules'])} (`adapter/`)."
        if a
        else "- Adapter: none (the decoder was frozen; only the projector was trained).",
        f"- Vision encoder: {vis}; {f['num_frames']} frames ({f['sample_mode']}) at {f['image_size']} px.",
        f"- Projector: `{meta['projector']['type']}`, {meta['projector']['in_dim']} → "
        f"{meta['projector']['out_dim']}, pool {meta['projector'].get('pool')} (`projector.safetensors`).",
        f"- Prompt ({meta['prompt'].get('style', 'custom')}): system `{meta['prompt']['system']}`, "
        f"user `{meta['prompt']['user']}`.",
        "- Tokenizer: Qwen3's"
        + (
            f" from `{meta['tokenizer']['source']}`."
            if meta["tokenizer"]["source"]
            else " (built offline from the Qwen2/3 BPE ranks; identical ids)."
        ),
        "",
        "## Training",
        f"- Stage `{t['stage']}`, {t['global_step']} steps of batch {t['batch_size']}, seed {t['seed']}.",
        f"- Data: train `{t['data']['train']}`, validation `{t['data']['val']}`.",
        f"- From checkpoint `{t['checkpoint']}`.",
        "",
        "## Metrics",
    ]
    if meta.get("metrics"):
        lines += ["| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {_fmt(x)} |" for k, x in meta["metrics"].items()]
    else:
        lines.append("None recorded at export time (pass `metrics=REPORT.json` to `python -m vlm.export`).")
    lines += [
        "",
        "## Load with this project",
        "```python",
        "import vlm",
        "model = vlm.load_exported('THIS_DIR')  # vision + projector + base decoder + adapter + tokenizer",
        "```",
        "Caption a folder: `python -m vlm.caption input=VIDEOS output=captions.jsonl checkpoint=THIS_DIR`.",
        "",
        "## Load the decoder without this project",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        f"base = AutoModelForCausalLM.from_pretrained('{base}')",
        "model = PeftModel.from_pretrained(base, 'THIS_DIR/adapter')",
        "```",
    ]
    if meta.get("merged"):
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
