"""Byte counts for the memory planner, derived from architectures built on the meta device.

Every parameter count here comes from a real module tree (transformers' Qwen3 / Qwen3-MoE classes,
open_clip's vision tower, the project's projector, peft's LoRA layers) built without storage, so a
config change (layers, widths, rank, pool) changes the plan without anyone retyping numbers. The
activation formulas are derived from what autograd saves in those modules; see `decoder_layer_saved`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from torch import nn

from vlm.decoder import as_dict, build_on_meta

NF4_BLOCK = 64  # bitsandbytes blocksize for 4-bit weights (transformers' BitsAndBytesConfig default)
NESTED_BLOCK = 256  # double quantization quantizes the absmax vector in blocks of 256
NF4_CODE_BYTES = 16 * 4  # each QuantState carries its own 16-entry fp32 NF4 code table
NESTED_CODE_BYTES = 256 * 4  # ... and the 256-entry fp32 dynamic map of the nested state


def nf4_bytes(numel: int, blocksize: int = NF4_BLOCK) -> int:
    """Bytes bitsandbytes allocates for one NF4 tensor with double quantization (QLoRA).

    packed 4-bit data (2 per byte) + one uint8 quantized absmax per block + the nested state:
    one fp32 absmax per 256 blocks, one fp32 offset (a scalar per tensor), and the two code
    tables. Checked on CPU against `bitsandbytes.functional.quantize_4bit` in the tests.
    """
    blocks = math.ceil(numel / blocksize)
    nested = math.ceil(blocks / NESTED_BLOCK)
    return math.ceil(numel / 2) + blocks + 4 * nested + 4 + NF4_CODE_BYTES + NESTED_CODE_BYTES


def expert_nf4_bytes(num_experts: int, hidden: int, intermediate: int) -> int:
    """One MoE layer's experts in NF4: vlm.moe's own count when it exports one, else the same formula.

    The fused kernel stores gate_up (E, 2I, H) and down (E, H, I) quantized as whole tensors.
    """
    try:
        from vlm.moe import expert_bytes  # the MoE kernel owns its storage layout
    except ImportError:
        return nf4_bytes(num_experts * 2 * intermediate * hidden) + nf4_bytes(
            num_experts * hidden * intermediate
        )
    return int(expert_bytes(num_experts, hidden, intermediate))


def _key(cfg: Mapping[str, Any]) -> str:
    return json.dumps(as_dict(cfg), sort_keys=True, default=str)


@dataclass(frozen=True)
class DecoderWeights:
    nf4_bytes: int  # quantized nn.Linear weights (+ absmax, nested state, code tables)
    dense_bytes: int  # embeddings, lm_head, norms, router, each in the dense dtype
    expert_bytes: int  # MoE expert tensors (NF4 when fused, else the dense dtype)
    largest_nf4_numel: int  # biggest Linear4bit: its de-quantized copy is a temporary buffer


@lru_cache(maxsize=16)
def _decoder_counts(model_key: str) -> tuple[int, int, int, int, int]:
    """(nf4 bytes, dense params, expert params, fused expert NF4 bytes, largest NF4 numel)."""
    mcfg = json.loads(model_key)
    model = build_on_meta(mcfg)
    quantize = mcfg.get("quantize") == "nf4"
    out_emb = model.get_output_embeddings()
    seen: set[int] = set()  # tied embeddings are one tensor
    nf4 = dense = experts = experts_nf4 = largest = 0
    for mod in model.modules():
        own = [p for p in mod.parameters(recurse=False) if id(p) not in seen]
        seen.update(id(p) for p in own)
        if type(mod).__name__.endswith("Experts"):  # 3D expert tensors: bitsandbytes skips them
            experts += sum(p.numel() for p in own)
            e, two_i, h = mod.gate_up_proj.shape  # (E, 2I, H)
            experts_nf4 += expert_nf4_bytes(e, h, two_i // 2)
        elif quantize and isinstance(mod, nn.Linear) and mod is not out_emb:
            # transformers' bitsandbytes integration converts every nn.Linear except the output head
            nf4 += nf4_bytes(mod.weight.numel())
            dense += mod.bias.numel() if mod.bias is not None else 0
            largest = max(largest, mod.weight.numel())
        else:
            dense += sum(p.numel() for p in own)
    return nf4, dense, experts, experts_nf4, largest


def decoder_weights(model_cfg: Mapping[str, Any], dense_bytes_per: int) -> DecoderWeights:
    """Decoder weight bytes as loaded: NF4 linears, dense rest in `dense_bytes_per`, experts per moe_kernel."""
    cfg = as_dict(model_cfg)
    nf4, dense, experts, experts_nf4, largest = _decoder_counts(
        _key({k: cfg.get(k) for k in ("arch", "quantize")})
    )
    fused = cfg.get("moe_kernel") == "fused"
    return DecoderWeights(
        nf4, dense * dense_bytes_per, experts_nf4 if fused else experts * dense_bytes_per, largest
    )


@lru_cache(maxsize=16)
def _lora_params(model_key: str, lora_key: str) -> tuple[int, int]:
    from peft import LoraConfig, get_peft_model

    lcfg = json.loads(lora_key)
    model = build_on_meta(json.loads(model_key))  # fresh: peft rewrites the module tree
    config = LoraConfig(
        r=int(lcfg["r"]),
        lora_alpha=int(lcfg["alpha"]),
        lora_dropout=float(lcfg.get("dropout", 0.0)),
        target_modules=list(lcfg["target_modules"]),
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as err:  # e.g. peft's ParamWrapper on 3D MoE experts refuses lora_dropout != 0
        raise ValueError(
            f"train.lora_cfg: peft cannot add this LoRA to {json.loads(model_key).get('name_or_path')}: {err} "
            "(for MoE decoders target q_proj,k_proj,v_proj,o_proj, or set train.lora_cfg.dropout=0)"
        ) from None
    trainable = [(n, p.numel()) for n, p in peft_model.named_parameters() if p.requires_grad]
    return sum(n for _, n in trainable), sum(n for name, n in trainable if ".experts." in name)


def lora_params(model_cfg: Mapping[str, Any], lora_cfg: Mapping[str, Any]) -> tuple[int, int]:
    """(all, on MoE experts) trainable LoRA parameters peft adds to the configured targets.

    peft 0.21 also targets 3D expert tensors whose names match (ParamWrapper: one A/B per expert).
    """
    cfg = as_dict(model_cfg)
    return _lora_params(_key({k: cfg.get(k) for k in ("arch", "name_or_path")}), _key(lora_cfg))


@dataclass(frozen=True)
class VisionGeom:
    params: int  # vision tower only (the text tower never goes to the GPU for captioning)
    width: int  # Dv: width of the patch tokens the projector reads
    mlp_hidden: int
    grid: tuple[int, int]  # patch grid per frame
    prefix_tokens: int  # class token(s) in the sequence besides the patches


@lru_cache(maxsize=8)
def _vision_geometry(vision_key: str) -> VisionGeom:
    import open_clip
    from open_clip.model import _build_vision_tower

    vcfg = json.loads(vision_key)
    if vcfg.get("arch"):
        mc = open_clip.get_model_config(vcfg["arch"])
        if mc is None:
            raise ValueError(f"vision.arch={vcfg['arch']!r}: not an open_clip model name")
    else:
        mc = vcfg["model_cfg"]
    with torch.device("meta"):
        visual = _build_vision_tower(mc["embed_dim"], mc["vision_cfg"])
    params = sum(p.numel() for p in visual.parameters())
    trunk = getattr(visual, "trunk", None)
    if trunk is not None:  # timm towers (SigLIP2)
        grid = tuple(trunk.patch_embed.grid_size)
        return VisionGeom(
            params, trunk.embed_dim, trunk.blocks[0].mlp.fc1.out_features, grid, trunk.num_prefix_tokens
        )
    grid = tuple(visual.grid_size)
    mlp = visual.transformer.resblocks[0].mlp.c_fc.out_features
    prefix = visual.positional_embedding.shape[0] - grid[0] * grid[1]
    return VisionGeom(params, visual.transformer.width, mlp, grid, prefix)


def vision_geometry(vision_cfg: Mapping[str, Any]) -> VisionGeom:
    return _vision_geometry(_key(vision_cfg))


def projector_params(proj_cfg: Mapping[str, Any], in_dim: int, out_dim: int, grid: tuple[int, int]) -> int:
    """Trainable projector parameters, from the project's own module built on the meta device."""
    with torch.device("meta"):
        try:
            from projector import build_projector
        except ImportError:  # projector/ not in this checkout yet: the configured Linear-GELU-Linear + tables
            hid = out_dim * int(proj_cfg.get("hidden_mult", 1))
            mods = [
                nn.Linear(in_dim, hid),
                nn.Linear(hid, out_dim),
                nn.Embedding(int(proj_cfg["max_frames"]), out_dim),
            ]
            return sum(p.numel() for m in mods for p in m.parameters()) + out_dim  # + output gain
        proj = build_projector(as_dict(proj_cfg), in_dim, out_dim, grid)
    return sum(p.numel() for p in proj.parameters() if p.requires_grad)


@dataclass(frozen=True)
class Shapes:
    """What the activation formulas need from the decoder config."""

    hidden: int  # H
    intermediate: int  # I (dense FFN width)
    heads: int  # nq
    kv_heads: int  # nkv
    head_dim: int  # d
    layers: int  # L
    vocab: int  # V
    experts: int = 0  # E (0: dense)
    top_k: int = 0  # k
    expert_inter: int = 0  # Ie


def decoder_shapes(model_cfg: Mapping[str, Any]) -> Shapes:
    a = as_dict(model_cfg)["arch"]
    return Shapes(
        a["hidden_size"],
        a["intermediate_size"],
        a["num_attention_heads"],
        a["num_key_value_heads"],
        a.get("head_dim") or a["hidden_size"] // a["num_attention_heads"],
        a["num_hidden_layers"],
        a["vocab_size"],
        a.get("num_experts") or 0,
        a.get("num_experts_per_tok") or 0,
        a.get("moe_intermediate_size") or 0,
    )


def decoder_layer_saved(sh: Shapes, b: int, s: int, lora: frozenset[str], r: int, dropout: bool) -> int:
    """Bytes autograd keeps per token for one decoder layer (forward saved for backward), no recompute.

    b = compute-dtype bytes (matmul outputs under autocast), s = residual-stream bytes (b; or 4 once
    peft's prepare_model_for_kbit_training has made embeddings and norms fp32). Flash / memory-efficient
    SDPA keeps no T x T scores, so everything is linear in tokens. Frozen weights need no saved inputs:
    bitsandbytes' MatMul4Bit keeps only the packed weight, and a frozen norm weight's mul keeps nothing.

      RMSNorm (x2)          4H + 4               fp32 upcast of its input + rsqrt
      QK-norm               4·(nq + nkv)·d       fp32 upcast of q and k
      SDPA                  4·b·nq·d + 4·nq      q, k, v (k/v repeated to nq heads: padded batches carry
                                                 a mask, so transformers skips enable_gqa), output, lse
      SwiGLU (dense)        3·s·I                gate (SiLU), silu(gate) and up (their product)
      MoE router            4·E + 24·k           fp32 softmax, top-k weights and their renormalisation
      MoE per routed slot   b·(H + 3·Ie)         gate_up out, silu out, expert out (the routing weight
                                                 multiplies it, and that weight needs a gradient)
      LoRA per target       (1 + b)·in + b·r     dropout mask + dropout out (lora_A's input), A out;
                                                 without dropout lora_A keeps the shared normed input
    """
    h, d, nq, nkv = sh.hidden, sh.head_dim, sh.heads, sh.kv_heads

    def lora_cost(names: tuple[str, ...], fan_in: int) -> int:
        hit = [n for n in names if n in lora]
        if not hit:
            return 0
        if dropout:  # each target has its own dropout, so its own mask and copy
            return len(hit) * ((1 + b) * fan_in + b * r)
        shared = b * fan_in * (1 if s == b else len(hit))  # autocast casts an fp32 input per consumer
        return shared + len(hit) * b * r

    attn = (4 * h + 4) + 4 * (nq + nkv) * d + 4 * b * nq * d + 4 * nq
    attn += lora_cost(("q_proj", "k_proj", "v_proj"), h) + lora_cost(("o_proj",), nq * d)
    if sh.experts:  # 3D experts are not nn.Linear, so no LoRA lands on them
        mlp = (4 * h + 4) + 4 * sh.experts + 24 * sh.top_k + sh.top_k * b * (h + 3 * sh.expert_inter)
    else:
        i = sh.intermediate
        mlp = (4 * h + 4) + 3 * s * i
        mlp += lora_cost(("gate_proj", "up_proj"), h) + lora_cost(("down_proj",), i)
    return attn + mlp


def backward_working_set(sh: Shapes, b: int, s: int) -> int:
    """Per-token gradient buffers alive while one layer is differentiated (beyond saved tensors).

    The residual-stream gradient and its accumulation (2·s·H), the fp32 gradient of a norm's upcast
    (4H), and the widest intermediate's gradients (3·b·I for SwiGLU; k·b·3·Ie for routed experts).
    """
    wide = 3 * b * (sh.top_k * sh.expert_inter if sh.experts else sh.intermediate)
    return 2 * s * sh.hidden + 4 * sh.hidden + wide


def vision_peak_per_token(g: VisionGeom, b: int) -> int:
    """Inference-mode ViT block peak per sequence token: residual + LN out + max(qkv + attn out, 2 MLP)."""
    w = g.width
    return b * (2 * w + max(4 * w, 2 * g.mlp_hidden))
