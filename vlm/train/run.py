"""`train(cfg) -> dict`: what `python train.py` runs, callable from tests and the demo.

Stage 1 (`train=stage1_projector`) trains the projector against the frozen decoder; stage 2
(`train=stage2_lora`) adds LoRA and usually starts from a stage-1 checkpoint (`train.init_from`).
`train.resume` continues a run at the same step, with the same data order and loss curve. Inputs
(annotations, checkpoints, value ranges, memory plan) are checked before any weight is loaded.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from vlm.config import to_typed
from vlm.config.entries import TrainEntry
from vlm.model.build import build_vlm, trainable_parameters
from vlm.train.checkpoint import LAST, SafetensorsCheckpointIO, StepCheckpoint, load_dir, read_state
from vlm.train.data import CaptionDataModule, Collator
from vlm.train.feature_cache import CacheFeatures
from vlm.train.module import CaptionModule
from vlm.train.preflight import check_train_inputs
from vlm.util.errors import Interrupted, UsageError
from vlm.util.files import atomic_write
from vlm.util.signals import StopSignal, signal_name

log = logging.getLogger(__name__)


def load_trained(module: CaptionModule, path: str | Path, only: str = "") -> None:
    """Load a checkpoint's trained weights (e.g. stage-1 projector into stage 2), those under `only` if
    given; a weight with no place in this model, or another shape, is named with both sides."""
    state = {k: v for k, v in load_dir(path)["state_dict"].items() if k.startswith(only)}
    own = module.state_dict()
    unknown = [k for k in state if k not in own]
    if unknown:
        raise UsageError(f"{path}: {len(unknown)} weights have no place in this model, e.g. {unknown[0]}")
    for k, v in state.items():
        if own[k].shape != v.shape:
            raise UsageError(
                f"{path}: {k} has shape {tuple(v.shape)}, this model expects {tuple(own[k].shape)}"
            )
    module.load_state_dict(state, strict=False)
    if any(k.startswith("vlm.vision.") for k in state):  # a tower tuned by an earlier stage
        module.tower_tuned = True
        module.vlm.vision.cache_key = module.vlm.vision.fingerprint()  # its features are not the config's
    log.info("loaded %d trained tensors from %s", len(state), path)


def train(cfg: Any, *, dataset_wrapper: Any = None) -> dict[str, Any]:
    """Run the stage `cfg.train` describes. `dataset_wrapper(dataset) -> dataset`, if given, wraps the
    train and val video datasets (the demo's blind control zeroes the frames this way)."""
    stop = StopSignal()
    stop.install()  # a signal while the model loads is not lost
    try:
        return _train(to_typed(cfg), stop, dataset_wrapper)
    finally:
        stop.restore()


def _train(cfg: TrainEntry, stop: StopSignal, dataset_wrapper: Any) -> dict[str, Any]:
    t0 = time.time()
    train_set, val_set = check_train_inputs(cfg)  # before a weight is loaded: one line per problem
    if dataset_wrapper is not None:
        train_set = dataset_wrapper(train_set)
        val_set = dataset_wrapper(val_set) if val_set is not None else None
    L.seed_everything(cfg.seed, workers=True)
    st = cfg.train
    vlm, processor = build_vlm(cfg)
    module = CaptionModule(vlm, processor, st, config=_plain(cfg))
    if st.init_from and not st.resume:
        load_trained(module, st.init_from)
    if st.resume:  # a tuned tower must be in place before the feature cache encodes with it
        load_trained(module, st.resume, only="vlm.vision.")
    per_step = st.batch_size * st.accumulate_grad_batches
    start = int(read_state(st.resume)["global_step"]) * per_step if st.resume else 0
    collate = Collator(processor, vlm.projector.num_tokens)
    dm = CaptionDataModule(train_set, val_set, collate, st.batch_size, cfg.data.num_workers, cfg.seed, start)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "config.json", _json(_plain(cfg)))
    if stop.signum is not None:
        raise Interrupted(
            stop.signum, f"stopped by {signal_name(stop.signum)} before training started; nothing to resume"
        )
    callbacks: list[L.Callback] = [
        StepCheckpoint(out / "checkpoints", st.checkpoint_every_n_steps),
        LearningRateMonitor(logging_interval="step"),
        stop,
    ]
    cache = None
    if cfg.data.cache_features:
        sampling = {k: v for k, v in train_set.sample_kw.items() if k != "timeout_s"}  # what changes features
        root = Path(cfg.data.cache_dir) if cfg.data.cache_dir else Path(cfg.data.root) / "feature_cache"
        cache = CacheFeatures(root, sampling, cfg.data.cache_batch_size, cfg.data.num_workers, cfg.progress)
        callbacks.insert(0, cache)
    t = cfg.trainer
    trainer = L.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=t.strategy,
        precision=t.precision,
        max_steps=st.max_steps,
        max_epochs=-1,
        accumulate_grad_batches=st.accumulate_grad_batches,
        gradient_clip_val=st.gradient_clip_val,
        val_check_interval=st.val_every_n_steps * st.accumulate_grad_batches if val_set is not None else None,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        limit_val_batches=st.limit_val_batches,
        logger=[TensorBoardLogger(out, name="tb"), CSVLogger(out, name="csv")],
        callbacks=callbacks,
        plugins=[SafetensorsCheckpointIO()],
        log_every_n_steps=st.log_every_n_steps,
        enable_progress_bar=cfg.progress,
        enable_model_summary=False,
        use_distributed_sampler=False,  # our samplers split the data across ranks themselves
        default_root_dir=out,
    )
    n_train = trainable_parameters(module)
    log.info("trainable parameters: %d (%s)", n_train, st.stage)
    trainer.fit(module, dm, ckpt_path=st.resume)
    last = out / "checkpoints" / LAST
    if stop.signum is not None:
        raise Interrupted(
            stop.signum,
            f"stopped by {signal_name(stop.signum)} after step {trainer.global_step}; checkpoint {last}; "
            f"resume with the same command plus train.resume={last}",
        )
    metrics = {
        k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1
    }
    return {
        "global_step": trainer.global_step,
        "trainable_params": n_train,
        "last_checkpoint": str(last),
        "train_seconds": time.time() - t0,
        "metrics": metrics,
        "cache": None if cache is None else {"directory": str(cache.directory), **cache.stats},
        "module": module,
    }


def _plain(cfg: TrainEntry) -> dict[str, Any]:
    return asdict(cfg)


def _json(d: dict[str, Any]) -> str:
    import json

    return json.dumps(d, ensure_ascii=False, indent=2) + "\n"
