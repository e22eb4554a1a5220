"""Merging a LoRA adapter into a de-quantized copy of its (4-bit) base, streamed: a plain transformers model.

The base's safetensors are read tensor by tensor and the output is written one shard per decoder layer
(plus one for embeddings, final norm and head), so the peak is one layer's output plus one chunk of
experts in float32, never the model (Qwen3-30B-A3B's experts alone are 116 GB in float32).
- 4-bit weights: an NF4 checkpoint's are read as they are; a 16-bit base is quantized on the way exactly
  as loading does (bitsandbytes' NF4 per Linear, `vlm.moe.nf4` per expert: the same codes, see tests).
  Each is de-quantized to float32 (the weights training fit the adapter to), W + (alpha/r)·B·A is formed
  in float32 and cast to `dtype`. The 4-bit tensors themselves are never modified.
- Routed experts: merged per chunk of experts with their ExpertLoRA (peft's `target_parameters` layout
  in the adapter) and written per expert (`experts.{e}.gate_proj.weight`, `up_proj`, `down_proj`), the
  hub's layout, which transformers (fusing them on load), vLLM and older stacks all read.
- Everything else (embeddings, norms, router, lm_head) is copied, cast to `dtype`.
The Linear layers that are 4-bit are found the way transformers' bitsandbytes integration picks them
(every nn.Linear but the output head) on a meta build of the base, so this cannot disagree with loading.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig

from vlm.config.schema import ModelConfig
from vlm.export.format import ExportError
from vlm.model.decoder import build_on_meta, nf4_checkpoint
from vlm.moe.adapter_format import PEFT_ROOT, peft_prefixes, peft_to_factors
from vlm.moe.lora import PARTS
from vlm.moe.nf4 import NF4Experts, dequantize_nf4, experts_per_chunk, quantize_nf4
from vlm.util.memory import release_freed

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
SHARD_BYTES = 2 << 30  # output shards close at the first layer boundary past 2 GiB
_QSTATE = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state.bitsandbytes__nf4")


class _Source:
    """Tensors of the base by name, from whichever shard holds them (shards mapped one group at a time)."""

    def __init__(self, files: list[Path]):
        self.where: dict[str, Path] = {}
        for f in files:
            with safe_open(str(f), framework="pt") as fh:
                self.where.update(dict.fromkeys(fh.keys(), f))
        self.open: dict[Path, object] = {}

    def get(self, key: str, rows: slice | None = None) -> torch.Tensor:
        f = self.where[key]
        if f not in self.open:
            self.open[f] = safe_open(str(f), framework="pt").__enter__()
        h = self.open[f]
        return h.get_slice(key)[rows] if rows is not None else h.get_tensor(key)

    def release(self) -> None:
        for h in self.open.values():
            h.__exit__(None, None, None)
        self.open = {}


def _adapter(adapter: Path | None) -> tuple[dict, dict, float]:
    """({Linear module: (A, B)}, {experts module: {part: (A, B)}}, alpha / r) of a saved adapter."""
    if adapter is None:
        return {}, {}, 0.0
    spec = json.loads((adapter / "adapter_config.json").read_text())
    if spec.get("use_dora") or spec.get("use_rslora"):
        raise ExportError(f"{adapter}: DoRA/rsLoRA adapters are not supported by merge")
    from safetensors.torch import load_file

    w = load_file(adapter / "adapter_model.safetensors")
    experts: dict[str, dict] = {}
    params = spec.get("target_parameters") or []
    for module in sorted({p.rsplit(".", 1)[0] for p in params}):
        parts = tuple(p for p in PARTS if f"{module}.{p}" in params)
        for part, prefix in peft_prefixes(module, parts).items():
            wa, wb = w.pop(prefix + "lora_A.weight"), w.pop(prefix + "lora_B.weight")
            experts.setdefault(module, {})[part] = (wa, wb)  # peft layout: reshaped once E is known
    linear = {}
    for key in [k for k in w if k.endswith(".lora_A.weight")]:
        module = key[len(PEFT_ROOT) : -len(".lora_A.weight")]
        linear[module] = (w.pop(key), w.pop(f"{PEFT_ROOT}{module}.lora_B.weight"))
    if w:
        raise ExportError(f"{adapter}: adapter weight {sorted(w)[0]} is neither Linear nor expert LoRA")
    return linear, experts, spec["lora_alpha"] / spec["r"]


def _linear_weight(src: _Source, name: str, quantized: bool, nf4: bool) -> torch.Tensor:
    """A Linear's weight (out, in) in float32 as training saw it (de-quantized NF4, or dense)."""
    if not quantized:
        return src.get(f"{name}.weight").float()
    if nf4:  # bitsandbytes' own serialization: packed codes + quant state
        import bitsandbytes.functional as bnbf

        stats = {k: src.get(f"{name}.weight.{k}") for k in _QSTATE if f"{name}.weight.{k}" in src.where}
        qs = bnbf.QuantState.from_dict(stats, device=torch.device("cpu"))
        qs.dtype = torch.float32  # code * absmax rounded once, to float32
        return bnbf.dequantize_4bit(src.get(f"{name}.weight"), qs)
    w = src.get(f"{name}.weight")
    return dequantize_nf4(quantize_nf4(w[None]))[0]  # bitsandbytes' codes (asserted in the tests)


def _expert_chunk(src: _Source, module: str, part: str, e0: int, e1: int, shape: tuple, nf4: bool):
    """Experts e0:e1 of `part` de-quantized to float32: (e, N, K)."""
    if nf4:
        g = lambda s: src.get(f"{module}.{part}_{s}", slice(e0, e1))  # noqa: E731
        t = NF4Experts(g("q"), g("absmax"), g("absmax2").view(torch.float32), g("offset").view(torch.float32),
                       (e1 - e0, *shape[1:]))  # fmt: skip
        return dequantize_nf4(t)
    if f"{module}.{part}" in src.where:  # transformers' fused layout
        dense = src.get(f"{module}.{part}", slice(e0, e1))
    else:
        rows = lambda p: torch.stack([src.get(f"{module}.{e}.{p}.weight") for e in range(e0, e1)])  # noqa: E731
        dense = (
            rows("down_proj") if part == "down_proj" else torch.cat((rows("gate_proj"), rows("up_proj")), 1)
        )
    return dequantize_nf4(quantize_nf4(dense))


def _merge_experts(src, module, shape_e, lora, scale, nf4, out, target) -> int:
    """Write `module`'s experts per expert into `out`; returns how many LoRA factors were merged."""
    e, h, i = shape_e
    used = 0
    for part in PARTS:
        shape = (e, 2 * i, h) if part == "gate_up_proj" else (e, h, i)
        ab = lora.get(part)
        if ab is not None:
            a, b = peft_to_factors(*ab, e)  # (E, r, in), (E, out, r)
            used += 2
        for e0 in range(0, e, experts_per_chunk(*shape[1:])):
            e1 = min(e, e0 + experts_per_chunk(*shape[1:]))
            w = _expert_chunk(src, module, part, e0, e1, shape, nf4)  # (e, N, K) float32
            if ab is not None:
                w.baddbmm_(b[e0:e1].float(), a[e0:e1].float(), alpha=scale)
            w = w.to(target)
            for j, ex in enumerate(range(e0, e1)):
                if part == "down_proj":
                    out[f"{module}.{ex}.down_proj.weight"] = w[j].clone()
                else:
                    out[f"{module}.{ex}.gate_proj.weight"] = w[j, :i].clone()
                    out[f"{module}.{ex}.up_proj.weight"] = w[j, i:].clone()
    return used


def merge_decoder(
    model: ModelConfig, base: str, adapter: Path | None, out: Path, dtype: str = "bfloat16"
) -> None:
    """Write base + LoRA to `out` as one plain transformers model (config, per-layer shards, index)."""
    from vlm.moe import FusedMoeExperts
    from vlm.moe.load import checkpoint_files, is_expert_key

    nf4 = nf4_checkpoint(base) is not None
    quantized = model.quantize == "nf4" or nf4
    config = AutoConfig.from_pretrained(base, revision=None if nf4 or Path(base).is_dir() else model.revision)
    meta = build_on_meta(config, "fused")  # shapes and module kinds as loading builds them
    head = meta.get_output_embeddings()
    linears = {n for n, m in meta.named_modules() if isinstance(m, torch.nn.Linear) and m is not head}
    experts = {n: (m.num_experts, m.hidden_dim, m.intermediate_dim)
               for n, m in meta.named_modules() if isinstance(m, FusedMoeExperts)}  # fmt: skip
    if experts and model.moe_kernel != "fused" and not nf4:
        experts = {}  # eager experts trained dense and without LoRA: copied like any tensor
    linear_lora, expert_lora, scale = _adapter(adapter)
    target = getattr(torch, dtype)
    src = _Source(checkpoint_files(base, None if nf4 or Path(base).is_dir() else model.revision))

    def owner(key: str) -> str | None:
        """The Linear or experts module a source tensor belongs to (None: copied as is)."""
        stem = key.removesuffix(".weight").split(".weight.")[0]
        if stem in linears:
            return stem
        return next((m for m in experts if key.startswith(m + ".") and (nf4 or is_expert_key(key))), None)

    groups: dict[str, list[str]] = {}
    for key in src.where:
        m = _LAYER.match(key)
        groups.setdefault(f"layer{int(m.group(1)):05d}" if m else "rest", []).append(key)
    out.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, int] = {}
    used, written, shard = 0, 0, {}

    def flush() -> None:
        nonlocal written, shard
        save_file(shard, out / f".shard-{written:05d}.safetensors", metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, written))
        written, shard = written + 1, {}
        release_freed()  # the written layer's tensors go back to the OS, not to a heap the next may not reuse

    for group in sorted(groups):
        done: set[str] = set()
        for key in sorted(groups[group]):
            mod = owner(key)
            if mod is None:
                t = src.get(key)
                shard[key] = t.to(target) if t.is_floating_point() else t
            elif mod in done:
                continue
            elif mod in linears:
                w = _linear_weight(src, mod, quantized, nf4)
                if mod in linear_lora:
                    a, b = linear_lora[mod]
                    w = w + scale * (b.float() @ a.float())
                    used += 2
                shard[f"{mod}.weight"] = w.to(target)
                done.add(mod)
            else:
                used += _merge_experts(
                    src, mod, experts[mod], expert_lora.get(mod, {}), scale, nf4, shard, target
                )
                done.add(mod)
        src.release()
        if sum(t.numel() * t.element_size() for t in shard.values()) >= SHARD_BYTES:
            flush()  # a shard holds whole layers; one layer at a time once layers are this big
    if shard or not written:
        flush()
    # Final names, as save_pretrained would give them: model.safetensors alone, else numbered + index.
    names = (
        ["model.safetensors"]
        if written == 1
        else [f"model-{i:05d}-of-{written:05d}.safetensors" for i in range(1, written + 1)]
    )
    for i, name in enumerate(names):
        (out / f".shard-{i:05d}.safetensors").rename(out / name)
    n_lora = 2 * len(linear_lora) + sum(2 * len(p) for p in expert_lora.values())
    if used != n_lora:
        raise ExportError(f"{adapter}: {n_lora - used} LoRA tensors found no module in base {base}")
    cfg = config.to_dict()
    cfg.pop("quantization_config", None)  # a plain model from here on
    cfg["dtype"] = dtype
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    if Path(base, "generation_config.json").is_file():
        (out / "generation_config.json").write_text(Path(base, "generation_config.json").read_text())
    if written > 1:
        index = {"metadata": {"total_size": sum((out / n).stat().st_size for n in names)},
                 "weight_map": {k: names[i] for k, i in sorted(weight_map.items())}}  # fmt: skip
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
