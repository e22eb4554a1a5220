"""Memory planner: the peak GPU memory of the training run a config describes, term by term.

The peak of a training step is at the start of backward: everything persistent (weights, trainable
parameters, their gradients and AdamW states) plus every tensor autograd saved in forward, the loss's
logits, the gradient buffers of the layer being differentiated and the de-quantized weight of the
layer being multiplied. Counts come from meta-device builds of the parts training builds, through the
same policy and registries (`vlm.plan.terms`); the architecture is the one of the model actually pointed
at (its config.json when `model.name_or_path` is a local directory). Only the CUDA context and the
allocator's fragmentation are constants (conf/training.yaml `plan:`). `check_fits(cfg)` is the check
`train.py` runs before loading a weight.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from vlm.config import to_typed
from vlm.config.entries import TrainEntry
from vlm.model.decoder import loaded_config
from vlm.model.processor import Processor
from vlm.model.tokenizer import load_tokenizer
from vlm.plan import terms as pt
from vlm.util.errors import UsageError

GIB = 1024**3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class PlanError(UsageError):
    """The configured run does not fit the tier's GPU memory."""


@dataclass
class Plan:
    terms: list[tuple[str, int, str]]  # (term, bytes, how it was counted)
    capacity_gib: float | None  # the tier's gpu.memory_gib; None on the cpu tier
    tokens_per_step: int  # decoder positions per micro-batch (visual + text, all videos)
    visual_tokens: int
    labelled_tokens: int
    layers: int  # decoder layers of the planned model
    load_bytes: int = 0  # peak while the decoder loads (before training allocates anything)
    load_note: str = ""

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
            "layers": self.layers,
            "load_gib": round(self.load_bytes / GIB, 4),
            "load_note": self.load_note,
        }


def prompt_tokens(cfg: TrainEntry) -> int:
    """Text tokens around the video in the configured prompt (every Qwen3 size shares one tokenizer)."""
    return Processor(load_tokenizer(None), cfg.prompt, cfg.data.max_caption_tokens).prompt_length()


def plan_memory(cfg: Any) -> Plan:
    """Estimate the peak GPU memory of one training step of the run `cfg` (a composed training config)."""
    cfg: TrainEntry = to_typed(cfg)
    st, lora = cfg.train, cfg.train.lora
    b = DTYPE_BYTES[
        cfg.gpu.compute_dtype
    ]  # matmul outputs under autocast; frozen weights stored in this dtype
    quantized = cfg.model.quantize == "nf4"
    fused = cfg.model.moe_kernel == "fused"
    # Stage 2 on a 4-bit model runs peft's prepare_model_for_kbit_training (vlm/model/lora.py): every
    # non-4-bit float weight (embeddings, lm_head, norms, router, 16-bit experts) becomes fp32, and with
    # fp32 embeddings and norms the residual stream is fp32 as well.
    upcast = lora is not None and quantized
    dense_b = s = 4 if upcast else b
    batch, frames = st.batch_size, cfg.data.num_frames
    cached, ckpt = cfg.data.cache_features, st.gradient_checkpointing

    hf = loaded_config(cfg.model)
    sh = pt.decoder_shapes(hf)
    tower = pt.vision_tower(cfg.vision)
    proj = pt.projector_module(cfg.projector, tower.width, sh.hidden, tower.grid)
    visual = proj.num_tokens(frames)  # tokens per video
    labelled = cfg.data.max_caption_tokens + 1  # caption + <|im_end|>
    n_tok = batch * (visual + prompt_tokens(cfg) + labelled)  # right-padded to the longest row
    n_lab = batch * labelled
    terms: list[tuple[str, int, str]] = []

    # -- persistent: weights and trainable state -------------------------------------------------
    w = pt.decoder_weights(hf, quantized)
    dname = "fp32 (peft kbit prep)" if upcast else cfg.gpu.compute_dtype
    nf4_note = "nn.Linear in NF4: 0.5 B/param + absmax/nested state" if quantized else "quantize: none"
    terms.append(("decoder_weights_nf4", w.nf4_bytes, nf4_note))
    terms.append(
        ("decoder_weights_dense", w.dense_params * dense_b, f"embeddings, lm_head, norms, router in {dname}")
    )
    if sh.experts:
        experts = w.expert_nf4_bytes if fused else w.expert_params * dense_b
        how = "NF4 (fused kernel)" if fused else f"{dname}: bitsandbytes skips 3D tensors"
        terms.append(("moe_experts", experts, how))
    n_vis = sum(p.numel() for p in tower.parameters())
    if not cfg.vision.freeze:
        vis_w, vis_note = n_vis * 16, f"{n_vis / 1e6:.0f}M trained params x (fp32 weight + grad + 2 AdamW)"
    elif cached:
        vis_w, vis_note = 0, "cached features: the tower is released before training"
    else:
        vis_w, vis_note = n_vis * b, f"{n_vis / 1e6:.0f}M frozen params stored in {cfg.gpu.compute_dtype}"
    terms.append(("vision_tower", vis_w, vis_note))
    n_proj = sum(p.numel() for p in proj.parameters() if p.requires_grad)
    terms.append(("projector", n_proj * 16, f"{n_proj / 1e6:.2f}M params x (fp32 weight + grad + 2 AdamW)"))
    parts: tuple[str, ...] = ()
    if lora is not None:
        count = pt.lora_params(hf, lora, cfg.model.moe_kernel)
        targets, parts = count.targets, count.expert_parts
        note = f"{count.params / 1e6:.1f}M params (r={lora.r}; {count.expert_params / 1e6:.0f}M on experts) x (fp32 weight + grad + 2 AdamW)"
        terms.append(("lora", count.params * 16, note))
    else:
        targets = ()
        terms.append(("lora", 0, f"{st.stage}: no LoRA"))

    # -- transient: what forward keeps for backward, and the buffers around it -------------------
    per_layer = pt.decoder_layer_saved(
        sh, b, s, frozenset(targets), lora.r if lora else 0, bool(lora and lora.dropout > 0), parts, fused
    )
    final = 4 * sh.hidden + s * sh.hidden  # final norm's fp32 upcast + last_hidden_state kept for the head
    if ckpt:  # each layer keeps its input; one layer is recomputed at a time during backward
        act = n_tok * (sh.layers * s * sh.hidden + per_layer + final)
        act_note = f"checkpointed: {sh.layers} x {s}H + one layer's {per_layer / 1024:.0f} KiB/token"
    else:
        act = n_tok * (sh.layers * per_layer + final)
        act_note = f"{sh.layers} layers x {per_layer / 1024:.0f} KiB/token (no checkpointing)"
    terms.append(("decoder_activations", act, f"{n_tok} tokens/step; {act_note}"))
    proj_act = proj.activation_bytes(batch, frames, b, prepared=cached)
    terms.append(
        ("projector_activations", proj_act, "input features, pooled tokens and the projector's saved tensors")
    )
    if cached:
        vis_act, vis_act_note = 0, "cached features: no tower pass"
    else:
        vis_act = tower.activation_bytes(batch * frames, b)
        vis_act_note = f"{'no_grad, ' if cfg.vision.freeze else ''}{batch * frames} frames; freed before the decoder (counted anyway)"
        if not cfg.vision.freeze:  # a training tower keeps every block's saved tensors for backward
            seq = tower.grid[0] * tower.grid[1] + tower.prefix_tokens
            vis_act += batch * frames * seq * tower.num_layers * b * (10 * tower.width + 2 * tower.mlp_hidden)
    terms.append(("vision_activations", vis_act, vis_act_note))
    # Only labelled rows reach the 151,936-wide head. Peak is in the loss's backward: fp32 log-probs
    # saved by cross_entropy, their gradient, and the fp32 gradient of the logits (3 x 4 B x V).
    terms.append(("logits", n_lab * sh.vocab * 12, f"{n_lab} labelled tokens x V={sh.vocab} x 3 fp32 copies"))
    if upcast and b < 4:  # autocast keeps a compute-dtype copy of the fp32 lm_head for backward
        terms.append(
            (
                "lm_head_autocast_copy",
                w.lm_head_numel * b,
                f"{cfg.gpu.compute_dtype} copy of the fp32 lm_head",
            )
        )
    grads = n_tok * pt.backward_working_set(sh, b, s, bool(parts))
    dequant = w.largest_nf4_numel * b * 2 if quantized else 0  # forward/backward dequant + its transposed use
    mask = batch * (n_tok // batch) ** 2  # (B, 1, T, T) bool SDPA mask for padded rows
    # ExpertLoRA casts its fp32 factors to the compute dtype per call and GroupedMM keeps the copies for
    # backward: one layer's (and their gradients) when checkpointed, every layer's otherwise.
    casts = pt.expert_lora_layer_numel(sh, lora.r, parts) * b if parts and b < 4 else 0
    casts *= 2 if ckpt else sh.layers + 1
    temp = grads + dequant + mask + casts
    terms.append(("temporary_buffers", temp, f"layer grads {grads / GIB:.2f} GiB + NF4 dequant of "
                  f"{w.largest_nf4_numel / 1e6:.0f}M weights + bool attention mask"
                  + (f" + ExpertLoRA casts {casts / GIB:.2f} GiB" if casts else "")))  # fmt: skip
    transient = sum(x for n, x, _ in terms if n in ("decoder_activations", "projector_activations",
                    "vision_activations", "logits", "temporary_buffers"))  # fmt: skip
    ps = cfg.plan
    terms.append(("allocator_fragmentation", int(transient * ps.fragmentation),
                  f"{ps.fragmentation:.0%} of the transient terms (caching allocator block slack)"))  # fmt: skip
    terms.append(
        ("cuda_context", int(ps.cuda_context_gib * GIB), "CUDA context + library workspaces (constant)")
    )
    load, load_note = load_peak(w, sh, b, quantized, fused, ps.cuda_context_gib)
    return Plan(terms, cfg.gpu.memory_gib, n_tok, batch * visual, n_lab, sh.layers, load, load_note)


def load_peak(w: pt.DecoderWeights, sh: pt.Shapes, b: int, quantized: bool, fused: bool, ctx_gib: float):
    """(bytes, note) of the peak while the decoder loads from 16-bit weights: the loaded model (dense
    tensors in the compute dtype, not yet upcast by k-bit preparation) plus the larger transient of the
    two phases: bitsandbytes quantizing its largest Linear (the weight in the compute dtype and as much
    scratch), or `vlm.moe.load` quantizing one chunk of experts. Tensors are read from memory-mapped
    shards straight to the device, so nothing else is staged; an NF4 checkpoint needs neither transient."""
    experts = (w.expert_nf4_bytes if fused else w.expert_params * b) if sh.experts else 0
    model = w.nf4_bytes + w.dense_params * b + experts
    linear = w.largest_nf4_numel * 2 * b if quantized else 0
    stream = pt.stream_transient_bytes(sh) if sh.experts and fused else 0
    total = model + max(linear, stream) + int(ctx_gib * GIB)
    note = (f"model {model / GIB:.2f} GiB + max(Linear quantization {linear / GIB:.2f}, experts chunk "
            f"{stream / GIB:.2f}) GiB + CUDA context")  # fmt: skip
    return total, note


def check_fits(cfg: Any) -> None:
    """Raise PlanError (one line) when the planned peak exceeds gpu.memory_gib, unless plan.force.

    Nothing to check on the cpu tier (gpu.memory_gib: null).
    """
    cfg = to_typed(cfg)
    if cfg.gpu.memory_gib is None or cfg.plan.force:
        return
    plan = plan_memory(cfg)
    if plan.load_bytes > plan.capacity_gib * GIB:
        raise PlanError(
            f"loading the decoder peaks at {plan.load_bytes / GIB:.1f} GiB, over gpu={cfg.gpu.name} "
            f"({plan.capacity_gib:g} GiB): {plan.load_note}; try a smaller model=... (or plan.force=true)"
        )
    if plan.fits:
        return
    top = sorted(plan.terms, key=lambda t: -t[1])[:3]
    biggest = ", ".join(f"{n} {b / GIB:.1f} GiB" for n, b, _ in top)
    hints = []
    if not cfg.train.gradient_checkpointing:
        hints.append("train.gradient_checkpointing=true")
    if cfg.train.batch_size > 1:
        hints.append(f"train.batch_size={max(1, cfg.train.batch_size // 2)}")
    if cfg.data.num_frames > 4:
        hints.append(f"data.num_frames={cfg.data.num_frames // 2}")
    if not cfg.data.cache_features:
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
    rows.append(f"{'load peak':<26}{plan.load_bytes / GIB:>9.3f}  {plan.load_note}")
    if plan.capacity_gib is None:
        rows.append("capacity: none (cpu tier): nothing to check")
    else:
        verdict = "fits" if plan.fits else "DOES NOT FIT"
        rows.append(f"capacity {plan.capacity_gib:g} GiB: {verdict}, headroom {plan.headroom:.1%}")
    rows.append(
        f"tokens/step {plan.tokens_per_step} (visual {plan.visual_tokens}, labelled {plan.labelled_tokens})"
    )
    return "\n".join(rows)


def render(cfg: Any, plan: Plan) -> str:
    """The CLI's output: a table, or JSON with the tier and model named."""
    if cfg.format == "json":
        head = {"tier": cfg.gpu.name, "model": cfg.model.name_or_path, "stage": cfg.train.stage}
        return json.dumps({**head, **plan.to_dict()}, indent=2) + "\n"
    title = f"gpu={cfg.gpu.name} model={cfg.model.name_or_path or 'tiny'} stage={cfg.train.stage}"
    return format_table(plan, title) + "\n"
