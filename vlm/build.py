"""Builders: turn a composed config into the VLM's parts and assemble them (parts can be swapped)."""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig

from projector import build_projector
from vlm.decoder import load_decoder
from vlm.lora import add_lora, freeze_decoder
from vlm.model import VLM, Prompt
from vlm.tokenizer import VOCAB_SIZE, load_tokenizer
from vlm.vision import VisionEncoder, build_vision


def embedding_rms(decoder: torch.nn.Module) -> float:
    """RMS of the used token-embedding rows: the scale visual tokens should start at."""
    w = decoder.get_input_embeddings().weight.detach()[:VOCAB_SIZE]
    return float(w.float().pow(2).mean().sqrt())


def tokenizer_source(model_cfg: Any) -> str | None:
    return model_cfg.get("tokenizer") or model_cfg.get("name_or_path")


def build_vlm(
    cfg: DictConfig,
    lora: bool | None = None,
    vision: VisionEncoder | None = None,
    decoder: torch.nn.Module | None = None,
    with_vision: bool = True,
) -> VLM:
    """VLM(vision, projector, decoder, tokenizer) from config; `lora` defaults to cfg.train.lora."""
    tok = load_tokenizer(tokenizer_source(cfg.model))
    if decoder is None:
        decoder = load_decoder(cfg.model, cfg.gpu.compute_dtype, cfg.gpu.attn_implementation)
    if vision is None and with_vision:
        vision = build_vision(cfg.vision)
    if vision is None:  # cached features: the geometry still comes from the encoder config
        probe = build_vision(cfg.vision)
        in_dim, grid = probe.out_dim, probe.grid
    else:
        in_dim, grid = vision.out_dim, vision.grid
    proj = build_projector(cfg.projector, in_dim, decoder.config.hidden_size, grid, embedding_rms(decoder))
    use_lora = cfg.train.lora if lora is None else lora
    ckpt = bool(cfg.train.get("gradient_checkpointing", False))
    decoder = add_lora(decoder, cfg.train.lora_cfg, ckpt) if use_lora else freeze_decoder(decoder, ckpt)
    prompt = Prompt(system=cfg.prompt.system, user=cfg.prompt.user)
    return VLM(vision, proj, decoder, tok, prompt)
