"""`train(cfg) -> dict`: what `python train.py` runs, callable from tests and the demo.

Stage 1 (`train=stage1_projector`) trains the projector against the frozen decoder; stage 2
(`train=stage2_lora`) adds LoRA and usually starts from a stage-1 checkpoint (`train.init_from`).
`train.resume` continues a run at the same step, with the same data order and loss curve.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from vlm.build import build_vlm
from vlm.checkpoint import SafetensorsCheckpointIO, load_dir, read_state
from vlm.datamodule import CaptionDataModule
from vlm.lit_module import CaptionModule
from vlm.plan import check_fits

log = logging.getLogger(__name__)


def load_trained(module: CaptionModule, path: str | Path) -> None:
    """Load a checkpoint's trained weights (e.g. stage-1 projector into stage 2); names both sides."""
    state = load_dir(path)["state_dict"]
    own = module.state_dict()
    unknown = [k for k in state if k not in own]
    if unknown:
        raise ValueError(f"{path}: {len(unknown)} weights have no place in this model, e.g. {unknown[0]}")
    for k, v in state.items():
        if own[k].shape != v.shape:
            raise ValueError(
                f"{path}: {k} has shape {tuple(v.shape)}, this model expects {tuple(own[k].shape)}"
            )
    module.load_state_dict(state, strict=False)
    log.info("loaded %d trained tensors from %s", len(state), path)


def datasets(cfg: DictConfig, module: CaptionModule) -> tuple[Any, Any]:
    """(train, val) datasets of the `data` group; cached features instead of frames when asked."""
    from data.dataset import dataset_from_config

    d = cfg.data
    sets = [dataset_from_config(d, "train"), dataset_from_config(d, "val") if d.get("val") else None]
    if not d.get("cache_features"):
        return sets[0], sets[1]
    from vlm.feature_cache import CachedFeatureDataset, build_cache, cache_dir

    # the cache is keyed by what changes the features: sampling, not timeouts or failure policy
    sampling = {k: v for k, v in sets[0].sample_kw.items() if k != "timeout_s"}
    where = cache_dir(
        d.get("cache_dir") or Path(d.root) / "feature_cache", module.vlm.vision.cache_key, sampling
    )
    out = []
    for ds in sets:
        if ds is not None:
            build_cache(ds, module.vlm.vision, where, batch_size=16, num_workers=int(d.num_workers))
        out.append(CachedFeatureDataset(ds.records, where) if ds is not None else None)
    return out[0], out[1]


def train(cfg: DictConfig) -> dict[str, Any]:
    t0 = time.time()
    L.seed_everything(int(cfg.seed), workers=True)
    check_fits(cfg)  # refuse, before loading a weight, a run the tier's GPU cannot hold
    tc = cfg.train
    out = Path(cfg.output_dir)
    module = CaptionModule(
        build_vlm(cfg),
        tc,
        config=OmegaConf.to_container(cfg, resolve=True),
        blind=bool(cfg.data.get("blind", False)),
    )
    if tc.get("init_from") and not tc.get("resume"):
        load_trained(module, tc.init_from)
    train_set, val_set = datasets(cfg, module)
    per_step = int(tc.batch_size) * int(tc.accumulate_grad_batches)
    start = int(read_state(tc.resume)["global_step"]) * per_step if tc.get("resume") else 0
    dm = CaptionDataModule(
        train_set, val_set, int(tc.batch_size), int(cfg.data.num_workers), int(cfg.seed), start
    )
    ckpt = ModelCheckpoint(
        dirpath=out / "checkpoints",
        filename="step_{step:06d}",  # no "=": paths stay usable as Hydra override values
        auto_insert_metric_name=False,
        every_n_train_steps=int(tc.checkpoint_every_n_steps),
        save_top_k=-1,
        save_last=True,
    )
    ckpt.FILE_EXTENSION = ""  # checkpoints are directories (safetensors + JSON)
    ckpt.CHECKPOINT_NAME_LAST = "last"
    trainer = L.Trainer(
        accelerator=cfg.trainer.accelerator,
        devices=cfg.trainer.devices,
        num_nodes=int(cfg.trainer.num_nodes),
        strategy=cfg.trainer.strategy,
        precision=cfg.trainer.precision,
        max_steps=int(tc.max_steps),
        max_epochs=-1,
        accumulate_grad_batches=int(tc.accumulate_grad_batches),
        gradient_clip_val=float(tc.gradient_clip_val) if tc.gradient_clip_val else None,
        val_check_interval=int(tc.val_every_n_steps) * int(tc.accumulate_grad_batches) if val_set else None,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        logger=[TensorBoardLogger(out, name="tb"), CSVLogger(out, name="csv")],
        callbacks=[ckpt, LearningRateMonitor(logging_interval="step")],
        plugins=[SafetensorsCheckpointIO()],
        log_every_n_steps=int(cfg.trainer.log_every_n_steps),
        enable_progress_bar=bool(cfg.trainer.enable_progress_bar),
        default_root_dir=out,
        limit_val_batches=int(tc.get("limit_val_batches", 4)),
        enable_model_summary=False,
    )
    n_train = sum(p.numel() for p in module.parameters() if p.requires_grad)
    log.info("trainable parameters: %d (%s)", n_train, tc.stage)
    trainer.fit(module, dm, ckpt_path=tc.get("resume"))
    metrics = {
        k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1
    }
    return {
        "global_step": trainer.global_step,
        "trainable_params": n_train,
        "last_checkpoint": str(out / "checkpoints" / "last"),
        "train_seconds": time.time() - t0,
        "metrics": metrics,
        "module": module,
    }
