"""Checks a training run passes before any weight is loaded: values, files, checkpoints, device, memory.

Each failure is one line naming the setting (as typed on the command line) and the reason, raised as
`UsageError` (exit 2) — or `RunFailure` (exit 1) for a missing accelerator — so a GPU tier never spends
minutes loading a 14B decoder to then find a typo in an annotation file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from vlm.config.entries import TrainEntry
from vlm.util.errors import RunFailure, UsageError

DTYPES = ("float32", "bfloat16", "float16")


def at_least(name: str, value: float | int | None, low: float, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or value < low:
        raise UsageError(f"{name}={value}: must be >= {low:g}")


def one_of(name: str, value: Any, choices: tuple[Any, ...]) -> None:
    if value not in choices:
        raise UsageError(f"{name}={value}: expected one of {', '.join(map(str, choices))}")


def check_model_source(name: str, path: str | None) -> None:
    """A local model directory must exist and hold config.json; hub ids are left to the loader."""
    if path is None:
        return
    looks_local = path.startswith(("/", "./", "../", "~")) or os.path.exists(path)
    if looks_local:
        p = Path(path).expanduser()
        if not p.is_dir():
            raise UsageError(f"{name}={path}: no such directory")
        if not (p / "config.json").is_file():
            raise UsageError(f"{name}={path}: not a model directory (no config.json)")


STRATEGIES = ("auto", "ddp")  # what has run in this project's tests (2-process gloo DDP)


def check_strategy(name: str, strategy: str) -> None:
    if strategy.startswith("fsdp"):
        raise UsageError(
            f"{name}={strategy}: not supported: the NF4 weights are stored as uint8, and FSDP can only shard "
            "4-bit weights stored in the compute dtype (bnb_4bit_quant_storage); use ddp"
        )
    one_of(name, strategy, STRATEGIES)


def check_accelerator(name: str, accelerator: str) -> None:
    import torch

    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise RunFailure(
            f"{name}={accelerator}: no CUDA device is visible here (use gpu=cpu, or check the driver)"
        )


def check_values(cfg: TrainEntry) -> None:
    st, d, t = cfg.train, cfg.data, cfg.trainer
    for key in ("batch_size", "max_steps", "accumulate_grad_batches", "checkpoint_every_n_steps",
                "val_every_n_steps", "log_every_n_steps", "limit_val_batches"):  # fmt: skip
        at_least(f"train.{key}", getattr(st, key), 1)
    at_least("train.val_caption_subset", st.val_caption_subset, 0)
    at_least("train.val_max_new_tokens", st.val_max_new_tokens, 1)
    for key in ("lr_projector", "lr_lora", "weight_decay", "warmup_ratio"):
        at_least(f"train.{key}", getattr(st, key), 0)
    if st.lora is not None:
        at_least("train.lora.r", st.lora.r, 1)
        at_least("train.lora.alpha", st.lora.alpha, 1)
        if not 0 <= st.lora.dropout < 1:
            raise UsageError(f"train.lora.dropout={st.lora.dropout}: must be in [0, 1)")
    at_least("data.num_frames", d.num_frames, 1)
    at_least("data.max_caption_tokens", d.max_caption_tokens, 1)
    at_least("data.num_workers", d.num_workers, 0)
    at_least("data.cache_batch_size", d.cache_batch_size, 1)
    at_least("data.decode_timeout_s", d.decode_timeout_s, 0.001)
    if not 0 <= d.max_failed_share < 1:
        raise UsageError(f"data.max_failed_share={d.max_failed_share}: must be in [0, 1)")
    at_least("trainer.devices", t.devices, 1)
    at_least("trainer.num_nodes", t.num_nodes, 1)
    check_strategy("trainer.strategy", t.strategy)
    one_of("gpu.compute_dtype", cfg.gpu.compute_dtype, DTYPES)
    one_of("model.quantize", cfg.model.quantize, ("nf4", "none"))
    one_of("model.moe_kernel", cfg.model.moe_kernel, ("fused", "eager"))
    frames = d.num_frames if d.sample_mode == "uniform" else (d.max_frames or 0)
    if frames > cfg.projector.max_frames or (d.sample_mode == "fps" and d.max_frames is None):
        raise UsageError(
            f"data: up to {frames or 'unbounded'} frames per clip but projector.max_frames={cfg.projector.max_frames}"
            " (set data.max_frames in fps mode, or raise projector.max_frames)"
        )
    if d.cache_features and not cfg.vision.freeze:
        raise UsageError(
            "data.cache_features=true needs a frozen tower (vision.freeze=true): its features change while it trains"
        )
    try:
        from data.sampling import check_args

        check_args(d.num_frames, d.sample_mode, d.fps, d.max_frames)
    except ValueError as e:
        raise UsageError(f"data: {e}") from None


def check_checkpoints(cfg: TrainEntry) -> None:
    from vlm.train.checkpoint import load_dir, read_state

    for key in ("init_from", "resume"):
        path = getattr(cfg.train, key)
        if path is None:
            continue
        try:
            state = read_state(path)
            load_dir(path)  # the tensors too: a truncated file fails here, not after loading the decoder
        except UsageError as e:
            raise UsageError(f"train.{key}: {e}") from None
        if "kovicap" not in state:
            raise UsageError(f"train.{key}={path}: not a kovicap training checkpoint (no run config inside)")


def load_datasets(cfg: TrainEntry) -> tuple[Any, Any]:
    from data.annotations import AnnotationError
    from data.dataset import dataset_from_config

    d = cfg.data
    if not Path(d.root).is_dir():
        raise UsageError(f"data.root={d.root}: no such directory")
    sets = []
    for split in ("train", "val"):
        path = getattr(d, split)
        if path is None:
            sets.append(None)
            continue
        if not Path(path).is_file():
            raise UsageError(f"data.{split}={path}: no such file")
        try:
            sets.append(dataset_from_config(d, split))
        except AnnotationError as e:
            n = len(e.problems)
            first = e.problems[0]
            raise UsageError(
                f"data.{split}={path}: {n} bad line(s), first {first}"
                f" (python -m data.check annotations={path} root={d.root} lists them all)"
            ) from None
    return sets[0], sets[1]


def check_train_inputs(cfg: TrainEntry) -> tuple[Any, Any]:
    """Every check above, then the memory plan; returns the (train, val) video datasets."""
    from vlm.plan import PlanError, check_fits

    check_values(cfg)
    check_model_source("model.name_or_path", cfg.model.name_or_path)
    if cfg.vision.weights is not None and not Path(cfg.vision.weights).is_file():
        raise UsageError(f"vision.weights={cfg.vision.weights}: no such file")
    train_set, val_set = load_datasets(cfg)
    check_checkpoints(cfg)
    check_accelerator("trainer.accelerator", cfg.trainer.accelerator)
    try:
        check_fits(cfg)
    except PlanError as e:
        raise UsageError(str(e)) from None
    return train_set, val_set
