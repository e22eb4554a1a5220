"""Typed entry configs: one per CLI (conf/<name>.yaml starts its defaults list with `<name>_schema`).

Every CLI shares `debug` and `verbose` (conf/cli.yaml). The planner and KMMLU compose the training
config itself (so they see the decoder, tier and sizes `train.py` would use) and add their own keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vlm.config.schema import (
    MISSING,
    DataConfig,
    FramesConfig,
    GenerationConfig,
    GpuConfig,
    LoadConfig,
    ModelConfig,
    PlanSettings,
    PromptConfig,
    StageConfig,
    TrainerConfig,
    VisionConfig,
)


@dataclass
class CliConfig:
    debug: bool = MISSING  # show tracebacks instead of one-line errors
    verbose: bool = MISSING  # keep library banners, progress bars and repeated warnings


@dataclass
class TrainEntry(CliConfig):
    model: ModelConfig = field(default_factory=ModelConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    projector: Any = MISSING  # typed by the chosen projector's own schema (projector/<type>.py)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: StageConfig = field(default_factory=StageConfig)
    gpu: GpuConfig = field(default_factory=GpuConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    plan: PlanSettings = field(default_factory=PlanSettings)
    seed: int = MISSING
    output_dir: str = MISSING
    progress: bool = MISSING


@dataclass
class PlanEntry(TrainEntry):
    format: str = MISSING  # table | json
    output: str | None = MISSING  # file to write; null: stdout


@dataclass
class KmmluEntry(TrainEntry):
    data_dir: str | None = MISSING
    hub_repo: str = MISSING
    hub_revision: str | None = MISSING
    subjects: list[str] | None = MISSING
    num_fewshot: int = MISSING
    fewshot_seed: int = MISSING
    mode: str = MISSING  # loglik (lm-eval `kmmlu`) | generate (lm-eval `kmmlu_direct`)
    limit: int | None = MISSING
    batch_size: int = MISSING
    max_length: int | None = MISSING
    adapter: str | None = MISSING
    device: str = MISSING
    output: str = MISSING


@dataclass
class CaptionEntry(CliConfig):
    input: str = MISSING
    output: str = MISSING
    export: str = MISSING
    overwrite: bool = MISSING
    batch_size: int = MISSING
    num_workers: int = MISSING
    retry_failed: bool = MISSING
    segment_seconds: float | None = MISSING
    progress: bool = MISSING
    prompt: PromptConfig | None = None
    frames: FramesConfig = field(default_factory=FramesConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    model: LoadConfig = field(default_factory=LoadConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


@dataclass
class ExportEntry(CliConfig):
    checkpoint: str = MISSING
    output: str = MISSING
    merge: bool = MISSING
    merge_dtype: str = MISSING
    overwrite: bool = MISSING
    metrics: str | None = MISSING
    quantize: bool = MISSING  # true: `checkpoint` is a Qwen3-MoE base decoder, saved as an NF4 checkpoint


@dataclass
class CaptionEvalEntry(CliConfig):
    predictions: str = MISSING
    references: str = MISSING
    tokenize: str = MISSING
    attributes: str = MISSING  # auto | true | false
    output: str = MISSING


@dataclass
class CheckEntry(CliConfig):
    annotations: str = MISSING
    root: str | None = MISSING
    decode: bool = MISSING
    num_frames: int = MISSING
    image_size: int = MISSING
    decode_timeout_s: float = MISSING


@dataclass
class SynthEntry(CliConfig):
    output: str = MISSING
    n_train: int = MISSING
    n_val: int = MISSING
    seed: int = MISSING
    image_size: int = MISSING
    fps: int = MISSING
    seconds: float = MISSING
    crf: int = MISSING
    workers: int = MISSING


@dataclass
class DemoWarmup:
    decoder_steps: int = MISSING
    decoder_lr: float = MISSING
    decoder_batch: int = MISSING
    decoder_text: str = MISSING  # words | frames: what the vision span says in the text warm-up
    vision_steps: int = MISSING
    vision_lr: float = MISSING
    vision_batch: int = MISSING


@dataclass
class DemoStage1:
    steps: int = MISSING
    batch_size: int = MISSING
    lr_projector: float = MISSING


@dataclass
class DemoStage2(DemoStage1):
    lr_lora: float = MISSING
    r: int = MISSING
    alpha: int = MISSING


@dataclass
class DemoCorpus:
    n_train: int = MISSING
    n_val: int = MISSING


@dataclass
class DemoCaption:
    batch_size: int = MISSING
    max_new_tokens: int = MISSING


@dataclass
class DemoEntry(CliConfig):
    output: str = MISSING  # the default seed writes here, seed N to <output>/seed<N>
    control: bool = MISSING
    seed: int = MISSING
    progress: bool = MISSING
    threads: int | None = MISSING  # torch intra-op threads; null: torch's default (one per core)
    precision: str = MISSING  # auto | 32-true | bf16-mixed; auto: bf16 only where the CPU has bf16 units
    eval_stage1: bool = MISSING  # also caption the held-out clips with the stage-1 model
    corpus: DemoCorpus = field(default_factory=DemoCorpus)
    warmup: DemoWarmup = field(default_factory=DemoWarmup)
    stage1: DemoStage1 = field(default_factory=DemoStage1)
    stage2: DemoStage2 = field(default_factory=DemoStage2)
    caption: DemoCaption = field(default_factory=DemoCaption)
    train_overrides: list[str] = field(default_factory=list)
