"""Memory planner: the peak GPU memory of the training run a config describes, term by term.

python -m vlm.plan gpu=l4                        # table: each term, total vs the tier's memory
python -m vlm.plan gpu=h100 train=stage2_lora output=json plan.output_file=plan.json

The peak of a training step is at the start of backward: everything persistent (weights, trainable
parameters, their gradients and AdamW states) plus every tensor autograd saved in forward, the loss's
logits, the gradient buffers of the layer being differentiated and the de-quantized weight of the
layer being multiplied. Counts come from meta-device builds (`vlm.plan_terms`); only the CUDA context
and the allocator's fragmentation are constants, documented in conf/plan.yaml.
`check_fits(cfg)` is the preflight `train.py` runs before loading a weight.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from vlm import plan_terms as pt
from vlm.decoder import as_dict

GIB = 1024**3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Settings:
    """Planner assumptions that are not part of the model: conf/plan.yaml repeats these defaults."""

    prompt_tokens: int = (
        56  # chat template around the video (52 for prompt=detailed; a test keeps this >= it)
    )
    caption_tokens: int = 128  # longest caption kept (VLM.loss truncates at max_caption_tokens=128)
    cuda_context_gib: float = 0.75  # CUDA context + cuBLAS/cuDNN workspaces: outside the allocator's count
    fragmentation: float = 0.10  # caching-allocator slack on the transient terms (activations, buffers)

    @classmethod
    def from_cfg(cls, cfg: Any) -> Settings:
        plan = as_dict(cfg.get("plan")) if cfg.get("plan") is not None else {}
        vals = {k: plan[k] for k in cls.__dataclass_fields__ if plan.get(k) is not None}
        data = cfg.get("data") or {}
        if "caption_tokens" not in vals and data.get("max_caption_tokens") is not None:
            vals["caption_tokens"] = int(data["max_caption_tokens"])
        return cls(**vals)


@dataclass
class Plan:
    terms: list[tuple[str, int, str]]  # (term, bytes, how it was counted)
    capacity_gib: float | None  # the tier's gpu.memory_gib; None on the cpu tier
    tokens_per_step: int  # decoder positions per micro-batch (visual + text, all videos)
    visual_tokens: int
    labelled_tokens: int
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(b for _, b, _ in self.terms)

    @property
    def total_gib(self) -> float:
        return self.total_bytes / GIB

    @property
    def fits(self) -> bool | None:
        return None if self.capacity_gib is None else self.total_gib <= self.capacity_gib

    @property
    def headroom(self) -> float | None:
        """Share of the capacity left free (0.25 = a quarter of the card unused)."""
        return None if self.capacity_gib is None else 1.0 - self.total_gib / self.capacity_gib

    def term(self, name: str) -> int:
        return next(b for n, b, _ in self.terms if n == name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "terms": [
                {"term": n, "bytes": b, "gib": round(b / GIB, 4), "note": note} for n, b, note in self.terms
            ],
            "total_gib": round(self.total_gib, 4),
            "capacity_gib": self.capacity_gib,
            "fits": self.fits,
            "headroom": None if self.headroom is None else round(self.headroom, 4),
            "tokens_per_step": self.tokens_per_step,
            "visual_tokens": self.visual_tokens,
            "labelled_tokens": self.labelled_tokens,
            "settings": self.settings,
        }


def plan_memory(cfg: Any) -> Plan:
    """Estimate the peak GPU memory of one training step of the run `cfg` (a composed train config)."""
    st = Settings.from_cfg(cfg)
    mcfg, vcfg, tcfg = as_dict(cfg.model), as_dict(cfg.vision), as_dict(cfg.train)
    compute = cfg.gpu.compute_dtype
    b = DTYPE_BYTES[compute]  # matmul outputs under autocast; frozen weights stored in this dtype
    quantized = mcfg.get("quantize") == "nf4"
    use_lora = bool(tcfg.get("lora"))
    # Stage 2 on a 4-bit model runs peft's prepare_model_for_kbit_training (vlm/lora.py): every
    # non-4-bit float weight (embeddings, lm_head, norms, router, 16-bit experts) becomes fp32, and with
    # fp32 embeddings and norms the residual stream is fp32 as well.
    upcast = use_lora and quantized
    dense_b = 4 if upcast else b
    s = 4 if upcast else b
    batch = int(tcfg["batch_size"])
    frames = int(cfg.data.num_frames)
    cached = bool(cfg.data.get("cache_features"))
    ckpt = bool(tcfg.get("gradient_checkpointing"))

    sh = pt.decoder_shapes(mcfg)
    geom = pt.vision_geometry(vcfg)
    pool = min(int(cfg.projector.pool), *geom.grid)
    visual = frames * pool * pool  # tokens per video
    labelled = st.caption_tokens + 1  # caption + <|im_end|>
    n_tok = batch * (visual + st.prompt_tokens + labelled)  # right-padded to the longest row
    n_lab = batch * labelled
    terms: list[tuple[str, int, str]] = []

    # -- persistent: weights and trainable state -------------------------------------------------
    w = pt.decoder_weights(mcfg, dense_b)
    dname = "fp32 (peft kbit prep)" if upcast else compute
    terms.append(
        (
            "decoder_weights_nf4",
            w.nf4_bytes,
            "nn.Linear in NF4: 0.5 B/param + absmax/nested state"
            if quantized
            else "no quantized layers (quantize: none)",
        )
    )
    terms.append(("decoder_weights_dense", w.dense_bytes, f"embeddings, lm_head, norms, router in {dname}"))
    if sh.experts:
        how = (
            "NF4 (fused kernel)"
            if mcfg.get("moe_kernel") == "fused"
            else f"{dname}: bitsandbytes skips 3D tensors"
        )
        terms.append(("moe_experts", w.expert_bytes, how))
    vis_w = 0 if cached else geom.params * b
    terms.append(
        (
            "vision_encoder",
            vis_w,
            "cached features: not on the GPU"
            if cached
            else f"{geom.params / 1e6:.0f}M frozen params in {compute}",
        )
    )
    n_proj = pt.projector_params(as_dict(cfg.projector), geom.width, sh.hidden, geom.grid)
    terms.append(("projector", n_proj * 16, f"{n_proj / 1e6:.2f}M params x (fp32 weight + grad + 2 AdamW)"))
    if use_lora:
        lcfg = as_dict(tcfg["lora_cfg"])
        n_lora, n_lora_experts = pt.lora_params(mcfg, lcfg)
        terms.append(
            (
                "lora",
                n_lora * 16,
                f"{n_lora / 1e6:.1f}M params (r={lcfg['r']}; {n_lora_experts / 1e6:.0f}M "
                "on experts) x (fp32 weight + grad + 2 AdamW)",
            )
        )
    else:
        lcfg, n_lora_experts = {}, 0
        terms.append(("lora", 0, f"{tcfg.get('stage')}: no LoRA"))

    # -- transient: what forward keeps for backward, and the buffers around it -------------------
    targets = frozenset(lcfg.get("target_modules") or ()) if use_lora else frozenset()
    per_layer = pt.decoder_layer_saved(
        sh, b, s, targets, int(lcfg.get("r", 0)), float(lcfg.get("dropout", 0)) > 0
    )
    final = 4 * sh.hidden + s * sh.hidden  # final norm's fp32 upcast + last_hidden_state kept for the head
    if ckpt:  # each layer keeps its input; one layer is recomputed at a time during backward
        act = n_tok * (sh.layers * s * sh.hidden + per_layer + final)
        act_note = f"checkpointed: {sh.layers} x {s}H + one layer's {per_layer / 1024:.0f} KiB/token"
    else:
        act = n_tok * (sh.layers * per_layer + final)
        act_note = f"{sh.layers} layers x {per_layer / 1024:.0f} KiB/token (no checkpointing)"
    terms.append(("decoder_activations", act, f"{n_tok} tokens/step; {act_note}"))
    dh = sh.hidden * int(cfg.projector.get("hidden_mult", 1))
    feats = batch * frames * geom.grid[0] * geom.grid[1] * geom.width * b  # (B, T, P, Dv) input
    proj_act = feats + batch * visual * (4 * geom.width + b * geom.width + 2 * b * dh + 12 * sh.hidden)
    terms.append(
        ("projector_activations", proj_act, "patch features + pooled fp32, fc1/GELU, LayerNorm, gain")
    )
    if cached:
        vis_act, vis_note = 0, "cached features: no encoder pass"
    else:
        seq = geom.grid[0] * geom.grid[1] + geom.prefix_tokens
        size = int(cfg.data.image_size)
        pixels = batch * frames * 3 * size * size * (1 + 4 + b)  # uint8 frames, fp32 normalised, cast
        vis_act = batch * frames * seq * pt.vision_peak_per_token(geom, b) + pixels
        vis_note = (
            f"no_grad, {batch * frames} frames x {seq} tokens; freed before the decoder (counted anyway)"
        )
    terms.append(("vision_activations", vis_act, vis_note))
    # Only labelled rows reach the 151,936-wide head. Peak is in the loss's backward: fp32 log-probs
    # saved by cross_entropy, their gradient, and the fp32 gradient of the logits (3 x 4 B x V).
    logits = n_lab * sh.vocab * 12
    terms.append(("logits", logits, f"{n_lab} labelled tokens x V={sh.vocab} x 3 fp32 copies"))
    grads = n_tok * pt.backward_working_set(sh, b, s)
    dequant = w.largest_nf4_numel * b * 2 if quantized else 0  # forward/backward dequant + its transposed use
    mask = batch * (n_tok // batch) ** 2  # (B, 1, T, T) bool SDPA mask for padded rows
    temp = grads + dequant + mask
    if n_lora_experts:
        # peft's ParamWrapper materialises W + B·A for a layer's expert tensors in fp32, and F.linear
        # keeps the merged weight for backward: one layer with checkpointing, every layer without.
        merged = 2 * sh.experts * 3 * sh.expert_inter * sh.hidden * 4
        temp += merged * (1 if ckpt else sh.layers)
    terms.append(
        (
            "temporary_buffers",
            temp,
            f"layer grads {grads / GIB:.2f} GiB + NF4 dequant of "
            f"{w.largest_nf4_numel / 1e6:.0f}M weights + bool attention mask",
        )
    )
    transient = act + proj_act + vis_act + logits + temp
    terms.append(
        (
            "allocator_fragmentation",
            int(transient * st.fragmentation),
            f"{st.fragmentation:.0%} of the transient terms (caching allocator block slack)",
        )
    )
    terms.append(
        ("cuda_context", int(st.cuda_context_gib * GIB), "CUDA context + library workspaces (constant)")
    )
    cap = cfg.gpu.get("memory_gib")
    return Plan(terms, None if cap is None else float(cap), n_tok, batch * visual, n_lab, asdict(st))


class PlanError(RuntimeError):
    """The configured run does not fit the tier's GPU memory."""


def check_fits(cfg: Any) -> None:
    """Raise PlanError (one line) when the planned peak exceeds gpu.memory_gib, unless plan.force.

    Nothing to check on the cpu tier (gpu.memory_gib: null).
    """
    if cfg.gpu.get("memory_gib") is None or (cfg.get("plan") or {}).get("force"):
        return
    plan = plan_memory(cfg)
    if plan.fits:
        return
    top = sorted(plan.terms, key=lambda t: -t[1])[:3]
    biggest = ", ".join(f"{n} {b / GIB:.1f} GiB" for n, b, _ in top)
    hints = []
    if not cfg.train.get("gradient_checkpointing"):
        hints.append("train.gradient_checkpointing=true")
    if int(cfg.train.batch_size) > 1:
        hints.append(f"train.batch_size={max(1, int(cfg.train.batch_size) // 2)}")
    if int(cfg.data.num_frames) > 4:
        hints.append(f"data.num_frames={int(cfg.data.num_frames) // 2}")
    if not cfg.data.get("cache_features"):
        hints.append("data.cache_features=true")
    hints.append("a smaller model=...")
    raise PlanError(
        f"planned peak {plan.total_gib:.1f} GiB exceeds gpu={cfg.gpu.name} ({plan.capacity_gib:g} GiB); "
        f"biggest terms: {biggest}; try {', '.join(hints)} (or plan.force=true to run anyway)"
    )


def format_table(plan: Plan, title: str = "") -> str:
    rows = [title] if title else []
    rows.append(f"{'term':<26}{'GiB':>9}  note")
    rows += [f"{n:<26}{b / GIB:>9.3f}  {note}" for n, b, note in plan.terms]
    rows.append(f"{'total':<26}{plan.total_gib:>9.3f}")
    if plan.capacity_gib is None:
        rows.append("capacity: none (cpu tier): nothing to check")
    else:
        verdict = "fits" if plan.fits else "DOES NOT FIT"
        rows.append(f"capacity {plan.capacity_gib:g} GiB: {verdict}, headroom {plan.headroom:.1%}")
    rows.append(
        f"tokens/step {plan.tokens_per_step} (visual {plan.visual_tokens}, labelled {plan.labelled_tokens})"
    )
    return "\n".join(rows)


def run(cfg: DictConfig) -> Plan:
    """What the CLI does: plan, then print a table or write JSON (stdout or plan.output_file)."""
    plan = plan_memory(cfg)
    if cfg.get("output", "table") == "json":
        text = json.dumps({"tier": cfg.gpu.name, "model": cfg.model.name_or_path, **plan.to_dict()}, indent=2)
        out = cfg.plan.get("output_file")
        if out:
            Path(out).write_text(text + "\n")
        else:
            sys.stdout.write(text + "\n")
    else:
        title = f"gpu={cfg.gpu.name} model={cfg.model.name_or_path or 'tiny'} stage={cfg.train.stage}"
        print(format_table(plan, title))
    return plan


if __name__ == "__main__":
    import hydra

    conf = str(Path(__file__).resolve().parents[1] / "conf")
    hydra.main(version_base="1.3", config_path=conf, config_name="plan")(run)()
