"""Byte counts for the memory planner, from the same modules training builds, on the meta device.

The decoder (transformers' Qwen3 / Qwen3-MoE class of the config actually pointed at), its LoRA (the one
policy in `vlm.model.lora`), the vision tower and the projector (their registries) are built without
storage, so a config change (layers, widths, rank, pool, tower) changes the plan without anyone retyping
numbers. The activation formulas are derived from what autograd saves in those modules; see
`decoder_layer_saved`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, PretrainedConfig

from vlm.config.schema import LoraConfig, VisionConfig
from vlm.model.decoder import build_on_meta
from vlm.model.lora import attach_lora
from vlm.moe import expert_bytes
from vlm.moe.nf4 import experts_per_chunk

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


def config_key(config: PretrainedConfig) -> str:
    return config.to_json_string(use_diff=False)


def _meta_decoder(key: str, moe_kernel: str = "eager") -> nn.Module:
    return build_on_meta(AutoConfig.for_model(**json.loads(key)), moe_kernel)


@dataclass(frozen=True)
class DecoderWeights:
    nf4_bytes: int  # quantized nn.Linear weights (+ absmax, nested state, code tables)
    dense_params: int  # embeddings, lm_head, norms, router: stored in the dense dtype
    expert_params: int  # MoE expert tensors, counted in the dense dtype when not fused
    expert_nf4_bytes: int  # the same tensors in the fused kernel's NF4 layout
    largest_nf4_numel: int  # biggest Linear4bit: its de-quantized copy is a temporary buffer
    lm_head_numel: int


@lru_cache(maxsize=16)
def _decoder_weights(key: str, quantize: bool) -> DecoderWeights:
    model = _meta_decoder(key)
    out_emb = model.get_output_embeddings()
    seen: set[int] = set()  # tied embeddings are one tensor
    nf4 = dense = experts = experts_nf4 = largest = 0
    for mod in model.modules():
        own = [p for p in mod.parameters(recurse=False) if id(p) not in seen]
        seen.update(id(p) for p in own)
        if type(mod).__name__.endswith("Experts"):  # 3D expert tensors: bitsandbytes skips them
            experts += sum(p.numel() for p in own)
            e, two_i, h = mod.gate_up_proj.shape  # (E, 2I, H)
            experts_nf4 += int(expert_bytes(e, h, two_i // 2))  # the MoE kernel owns its storage layout
        elif quantize and isinstance(mod, nn.Linear) and mod is not out_emb:
            # transformers' bitsandbytes integration converts every nn.Linear except the output head
            nf4 += nf4_bytes(mod.weight.numel())
            dense += mod.bias.numel() if mod.bias is not None else 0
            largest = max(largest, mod.weight.numel())
        else:
            dense += sum(p.numel() for p in own)
    return DecoderWeights(nf4, dense, experts, experts_nf4, largest, out_emb.weight.numel())


def decoder_weights(config: PretrainedConfig, quantize: bool) -> DecoderWeights:
    return _decoder_weights(config_key(config), quantize)


@dataclass(frozen=True)
class LoraCount:
    """What the LoRA policy builds on the decoder training loads (`attach_lora` on a meta build)."""

    params: int  # every trainable LoRA parameter
    expert_params: int  # of which on the routed experts (ExpertLoRA)
    targets: tuple[str, ...]  # short names of the Linear modules peft wraps
    expert_parts: tuple[str, ...]  # the experts' tensors with an ExpertLoRA ("gate_up_proj", "down_proj")


@lru_cache(maxsize=16)
def _lora_params(key: str, lora_key: str, moe_kernel: str) -> LoraCount:
    lora = LoraConfig(**json.loads(lora_key))
    model = attach_lora(_meta_decoder(key, moe_kernel), lora)  # the policy training uses, on a meta build
    trainable = [(n, p.numel()) for n, p in model.named_parameters() if p.requires_grad]
    experts = [(n, k) for n, k in trainable if ".experts.lora." in n]  # ...experts.lora.gate_up_A
    targets = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, _ in trainable if ".lora_" in n}
    parts = {n.rsplit(".", 1)[-1].rsplit("_", 1)[0] + "_proj" for n, _ in experts}
    order = ("gate_up_proj", "down_proj")
    return LoraCount(
        sum(k for _, k in trainable),
        sum(k for _, k in experts),
        tuple(sorted(targets)),
        tuple(p for p in order if p in parts),
    )


def lora_params(config: PretrainedConfig, lora: LoraConfig, moe_kernel: str = "fused") -> LoraCount:
    """Trainable LoRA parameters (all, on MoE experts) and what they sit on, for a decoder loaded with
    `moe_kernel` (fused: experts get ExpertLoRA; eager: attention only)."""
    return _lora_params(config_key(config), json.dumps(asdict(lora), sort_keys=True), moe_kernel)


@lru_cache(maxsize=8)
def _vision(key: str) -> Any:
    from vlm.model.vision import build_vision_on_meta

    return build_vision_on_meta(VisionConfig(**json.loads(key)))


def vision_tower(cfg: VisionConfig) -> Any:
    """The configured tower's module on the meta device (geometry, parameter count, activation bytes)."""
    return _vision(json.dumps(asdict(cfg), sort_keys=True))


def projector_module(cfg: Any, in_dim: int, out_dim: int, grid: tuple[int, int]) -> Any:
    from projector import build_projector

    with torch.device("meta"):
        return build_projector(cfg, in_dim, out_dim, grid)


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


def decoder_shapes(c: PretrainedConfig) -> Shapes:
    return Shapes(
        c.hidden_size,
        c.intermediate_size,
        c.num_attention_heads,
        c.num_key_value_heads,
        getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
        c.num_hidden_layers,
        c.vocab_size,
        getattr(c, "num_experts", None) or 0,
        getattr(c, "num_experts_per_tok", None) or 0,
        getattr(c, "moe_intermediate_size", None) or 0,
    )


def decoder_layer_saved(
    sh: Shapes,
    b: int,
    s: int,
    lora: frozenset[str],
    r: int,
    dropout: bool,
    expert_parts: tuple[str, ...] = (),
    fused: bool = True,
) -> int:
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
      MoE per routed slot   b·3·Ie (fused)       [gate|up] pre-activation and SiLU·up (vlm.moe.experts:
                                                 the expert output is not kept, the routing-weight
                                                 gradient is <g, h>); eager keeps the output too: +b·H
      ExpertLoRA per slot   b·(H + r) gate_up    the gathered rows and the rank-r middle (GroupedMM);
                            b·(H + r) down       the additive output (_Down keeps it for the routing-
                                                 weight gradient) and the middle; h is kept anyway
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
    if sh.experts:
        slot = b * 3 * sh.expert_inter + (0 if fused else b * h) + len(expert_parts) * b * (h + r)
        mlp = (4 * h + 4) + 4 * sh.experts + 24 * sh.top_k + sh.top_k * slot
    else:
        i = sh.intermediate
        mlp = (4 * h + 4) + 3 * s * i
        mlp += lora_cost(("gate_proj", "up_proj"), h) + lora_cost(("down_proj",), i)
    return attn + mlp


def backward_working_set(sh: Shapes, b: int, s: int, expert_lora: bool = False) -> int:
    """Per-token gradient buffers alive while one layer is differentiated (beyond saved tensors).

    The residual-stream gradient and its accumulation (2·s·H), the fp32 gradient of a norm's upcast
    (4H), and the widest intermediate's gradients (3·b·I for SwiGLU; k·b·3·Ie for routed experts, plus
    k·b·2H with ExpertLoRA: the gradient of down's additive output and dy gathered per row).
    """
    wide = 3 * b * (sh.top_k * sh.expert_inter if sh.experts else sh.intermediate)
    if sh.experts and expert_lora:
        wide += sh.top_k * b * 2 * sh.hidden
    return 2 * s * sh.hidden + 4 * sh.hidden + wide


def expert_lora_layer_numel(sh: Shapes, r: int, parts: tuple[str, ...]) -> int:
    """Elements of one layer's ExpertLoRA factors: E·r·(in + out) per adapted tensor."""
    fan = {"gate_up_proj": sh.hidden + 2 * sh.expert_inter, "down_proj": sh.expert_inter + sh.hidden}
    return sh.experts * r * sum(fan[p] for p in parts)


def stream_transient_bytes(sh: Shapes, source_bytes: int = 2) -> int:
    """Bytes alive on top of the model while `vlm.moe.load` quantizes one chunk of experts (of gate_up,
    the wider tensor): the chunk read as gate and up stacks and their concatenation (2 x the checkpoint's
    bytes per element), its float32 scratch and bucketize's int32 codes (4 + 4), and the tensor's float32
    absmax until its double quantization. The codes go straight into the module's buffer."""
    n, k = 2 * sh.expert_inter, sh.hidden
    elems = experts_per_chunk(n, k) * n * k
    return elems * (2 * source_bytes + 8) + sh.experts * n * k // 64 * 4
