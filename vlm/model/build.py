"""Builders: turn a typed training config into the VLM's parts and assemble them; ready-made parts
(a tiny decoder, a warmed tower) can be passed in and go through the same assembly."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from projector import build_projector
from vlm.config.entries import TrainEntry
from vlm.config.schema import ModelConfig, PromptConfig
from vlm.model.decoder import DTYPES, load_decoder
from vlm.model.lora import prepare_decoder
from vlm.model.processor import Processor
from vlm.model.tokenizer import VOCAB_SIZE, load_tokenizer
from vlm.model.vision import VisionTower, build_vision
from vlm.model.vlm import VLM


def embedding_rms(decoder: nn.Module) -> float:
    """RMS of the used token-embedding rows: the scale visual tokens should start at. Row norms in fp32,
    summed in fp64: `w.float().pow(2).mean()` made two fp32 copies of the table (5 GB at 8B's 622 M
    entries, on the accelerator; 2 s on a CPU core even in fp32), and one `vector_norm` over all of
    it drifted 11 % in fp32 (its CPU kernel does not sum pairwise at that length)."""
    w = decoder.get_input_embeddings().weight.detach()[:VOCAB_SIZE]
    rows = torch.linalg.vector_norm(w, dim=1, dtype=torch.float32)  # [V]
    return float(rows.double().pow(2).sum().div(w.numel()).sqrt())


def tokenizer_source(model: ModelConfig) -> str | None:
    """`model.tokenizer`, else the decoder's own (a hub id, or a local directory that carries one), else
    None: Qwen3's tokenizer built offline (same ids)."""
    if model.tokenizer is not None:
        return model.tokenizer
    src = model.name_or_path
    if src is None or (Path(src).is_dir() and not (Path(src) / "tokenizer_config.json").is_file()):
        return None
    return src


def build_processor(model: ModelConfig, prompt: PromptConfig, max_caption_tokens: int) -> Processor:
    return Processor(load_tokenizer(tokenizer_source(model)), prompt, max_caption_tokens)


def build_vlm(
    cfg: TrainEntry, vision: VisionTower | None = None, decoder: nn.Module | None = None
) -> tuple[VLM, Processor]:
    """(VLM, Processor) as the stage in `cfg.train` trains them: decoder frozen or with LoRA, tower
    frozen unless `vision.freeze` is false, a fresh projector scaled to the decoder's embeddings."""
    if decoder is None:
        decoder = load_decoder(cfg.model, cfg.gpu.compute_dtype, cfg.gpu.attn_implementation)
    if vision is None:
        vision = build_vision(cfg.vision)
    if vision.frozen and cfg.gpu.compute_dtype != "float32":  # a frozen tower needs no fp32 master weights
        vision.to(DTYPES[cfg.gpu.compute_dtype])
    proj = build_projector(
        cfg.projector, vision.width, decoder.config.hidden_size, vision.grid, embedding_rms(decoder)
    )
    decoder = prepare_decoder(decoder, cfg.train.lora, cfg.train.gradient_checkpointing)
    processor = build_processor(cfg.model, cfg.prompt, cfg.data.max_caption_tokens)
    return VLM(vision, proj, decoder), processor


def trainable_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
