"""Typed configs of the config groups (conf/<group>/*.yaml merge into these; Hydra checks keys and types).

Values live in the YAML files, each with a comment saying why; the dataclasses here give the keys, their
types and whether they are required (`MISSING`). Model code receives these objects (no Hydra, no
OmegaConf): entry points turn the composed config into them with `vlm.config.to_typed`.
Projector settings are typed per projector type by the projector's own file (see `projector/`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

MISSING: Any = "???"  # OmegaConf's marker for a value the YAML (or the command line) must give


@dataclass
class ArchConfig:
    """The decoder's architecture as in its config.json (meta-device builds, tiny random models)."""

    model_type: str = MISSING  # qwen3 | qwen3_moe
    num_hidden_layers: int = MISSING
    hidden_size: int = MISSING
    num_attention_heads: int = MISSING
    num_key_value_heads: int = MISSING
    head_dim: int = MISSING
    intermediate_size: int = MISSING
    tie_word_embeddings: bool = MISSING
    vocab_size: int = MISSING
    max_position_embeddings: int = MISSING
    rope_theta: float = MISSING
    rms_norm_eps: float = MISSING
    num_experts: int | None = None  # MoE only
    num_experts_per_tok: int | None = None
    moe_intermediate_size: int | None = None
    norm_topk_prob: bool | None = None
    decoder_sparse_step: int | None = None


@dataclass
class ModelConfig:
    """The Qwen3 decoder: where its weights come from and how they are loaded."""

    name_or_path: str | None = MISSING  # hub id or local directory; null: seeded random model of `arch`
    revision: str | None = MISSING  # hub commit (or branch) for reproducible runs
    tokenizer: str | None = MISSING  # tokenizer source; null: the decoder's own, else Qwen3's built offline
    quantize: str = MISSING  # nf4 | none
    moe_kernel: str = MISSING  # MoE decoders only: fused (NF4 experts, vlm/moe) | eager (transformers')
    init_seed: int = MISSING  # seed of the random weights when name_or_path is null
    arch: ArchConfig = field(default_factory=ArchConfig)
    expected_params: float | None = None  # published parameter count (tests check `arch` against it)
    expected_active_params: float | None = None  # MoE: parameters active per token


@dataclass
class VisionConfig:
    """The frozen vision tower; `type` picks its implementation in vlm/model/vision/."""

    type: str = MISSING  # open_clip (open_clip's own ViT) | open_clip_timm (a timm trunk, e.g. SigLIP2)
    arch: str | None = MISSING  # open_clip model name; null: the custom `model_cfg` (tiny)
    pretrained: str | None = MISSING  # open_clip pretrained tag; null: architecture only, random weights
    weights: str | None = MISSING  # local safetensors of the tower (or whole CLIP); overrides `pretrained`
    image_size: int = MISSING
    init_seed: int = MISSING  # seed of random weights (pretrained null, no weights)
    freeze: bool = MISSING
    feature_layer: int = MISSING  # block whose patch tokens the projector reads (-1 last, -2 penultimate)
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)
    model_cfg: dict[str, Any] | None = None  # open_clip CLIP(embed_dim, vision_cfg, text_cfg) for arch null


@dataclass
class PromptConfig:
    style: str = MISSING
    system: str = MISSING
    user: str = MISSING


@dataclass
class DataConfig:
    root: str = MISSING
    train: str = MISSING
    val: str | None = MISSING
    num_frames: int = MISSING
    sample_mode: str = MISSING  # uniform | fps
    fps: float | None = MISSING
    max_frames: int | None = MISSING
    image_size: int = MISSING
    decode_timeout_s: float = MISSING
    max_failed_share: float = MISSING
    allow_partial: bool = MISSING  # videos whose index promises more frames than decode: use (warned) or fail
    max_caption_tokens: int = MISSING
    num_workers: int = MISSING
    cache_features: bool = MISSING
    cache_dir: str | None = MISSING
    cache_batch_size: int = MISSING


@dataclass
class LoraConfig:
    r: int = MISSING
    alpha: int = MISSING
    dropout: float = MISSING
    target_modules: list[str] = field(default_factory=list)


@dataclass
class StageConfig:
    """One training stage (conf/train/*.yaml)."""

    stage: str = MISSING
    lora: LoraConfig | None = MISSING  # null: the decoder stays frozen (stage 1)
    lr_projector: float = MISSING
    lr_lora: float = MISSING
    lr_vision: float = MISSING  # the tower's rate when vision.freeze=false
    weight_decay: float = MISSING
    warmup_ratio: float = MISSING
    max_steps: int = MISSING
    batch_size: int = MISSING
    accumulate_grad_batches: int = MISSING
    gradient_clip_val: float | None = MISSING
    gradient_checkpointing: bool = MISSING
    val_every_n_steps: int = MISSING
    limit_val_batches: int = MISSING
    val_caption_subset: int = MISSING
    val_max_new_tokens: int = MISSING
    checkpoint_every_n_steps: int = MISSING
    log_every_n_steps: int = MISSING
    init_from: str | None = MISSING
    resume: str | None = MISSING


@dataclass
class GpuConfig:
    name: str = MISSING
    memory_gib: float | None = MISSING
    compute_dtype: str = MISSING  # float32 | bfloat16 | float16
    attn_implementation: str = MISSING


@dataclass
class TrainerConfig:
    """Where and how many processes run (Lightning Trainer arguments)."""

    accelerator: str = MISSING  # cpu | gpu | auto
    devices: int = MISSING
    num_nodes: int = MISSING
    strategy: str = MISSING  # auto | ddp
    precision: str = MISSING


@dataclass
class PlanSettings:
    force: bool = MISSING
    cuda_context_gib: float = MISSING
    fragmentation: float = MISSING


@dataclass
class FramesConfig:
    """Frame sampling at captioning time; null values take what the export was trained with."""

    num_frames: int | None = MISSING
    sample_mode: str | None = MISSING
    fps: float | None = MISSING
    max_frames: int | None = MISSING
    decode_timeout_s: float = MISSING
    allow_partial: bool = MISSING


@dataclass
class GenerationConfig:
    max_new_tokens: int = MISSING
    num_beams: int = MISSING
    do_sample: bool = MISSING
    temperature: float = MISSING
    top_p: float = MISSING
    repetition_penalty: float = MISSING


@dataclass
class LoadConfig:
    """How captioning loads an export's decoder."""

    base: str | None = MISSING
    quantize: str | None = MISSING
    compute_dtype: str | None = MISSING
    merged: bool = MISSING
