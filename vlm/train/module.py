"""The one LightningModule: optimisation, schedules, logging, validation captions and checkpoint contents.

It calls the VLM on tensors (the collator has already tokenized); validation captions a small subset
through `VideoCaptioner` and computes CIDEr-D once over the predictions gathered from every rank.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as L
import torch
import torch.distributed as dist
from torch.optim.lr_scheduler import LambdaLR

from vlm.config.schema import StageConfig
from vlm.model.captioner import VideoCaptioner
from vlm.model.processor import Processor
from vlm.model.vlm import VLM


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """Linear warmup to 1, then cosine to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj` (a one-element list without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class CaptionModule(L.LightningModule):
    def __init__(self, vlm: VLM, processor: Processor, stage: StageConfig, config: dict[str, Any]) -> None:
        super().__init__()
        self.vlm = vlm
        self.processor = processor
        self.stage = stage
        self.config = config  # the resolved run config, stored in every checkpoint
        self.strict_loading = False  # checkpoints hold only the trained parameters
        # The tower's weights differ from what its config builds (it trains now, or an earlier stage tuned it).
        self.tower_tuned = vlm.vision is not None and not vlm.vision.frozen
        self._val_preds: dict[str, str] = {}
        self._val_refs: dict[str, list[str]] = {}

    def trainable_names(self) -> set[str]:
        return {n for n, p in self.named_parameters() if p.requires_grad}

    def _feats(self, batch: dict[str, Any]) -> torch.Tensor:
        return batch["feats"] if batch["prepared"] else self.vlm.encode(batch["frames"])

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        total, n = self.vlm.loss_sum(
            self._feats(batch),
            batch["input_ids"],
            batch["attention_mask"],
            batch["labels"],
            batch["prepared"],
        )
        # Token-weighted across ranks: divide by the labelled tokens of every rank, times the world size
        # because DDP averages gradients. So N ranks of batch B train exactly like one process of N·B.
        world = self.trainer.world_size
        sums = torch.stack([total.detach(), n.float()])  # one all-reduce for both sums
        if world > 1:
            sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
        total_all, n_all = sums[0], sums[1]
        loss = total * world / n_all
        self.log("train/loss", total_all / n_all, prog_bar=True, on_step=True, batch_size=len(batch["video"]))
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        feats = self._feats(batch)
        loss = self.vlm.loss(
            feats, batch["input_ids"], batch["attention_mask"], batch["labels"], batch["prepared"]
        )
        self.log("val/loss", loss, prog_bar=True, batch_size=feats.shape[0], sync_dist=True)
        room = self.stage.val_caption_subset - len(self._val_preds)
        if room > 0:  # CIDEr-D on a small held-out subset per rank: generation is the slow part
            preds = VideoCaptioner(self.vlm, self.processor).caption_features(
                feats[:room], prepared=batch["prepared"], max_new_tokens=self.stage.val_max_new_tokens
            )
            for video, pred, refs in zip(batch["video"], preds, batch["captions"], strict=False):
                self._val_preds[video], self._val_refs[video] = pred, list(refs)

    def on_validation_epoch_end(self) -> None:
        # Every rank gathers every rank's captions, so all compute the same CIDEr-D over the same set
        # (a video seen by two ranks counts once) and log the value one process would.
        parts = gather_objects((self._val_preds, self._val_refs))
        preds = {k: v for p, _ in parts for k, v in p.items()}
        refs = {k: v for _, r in parts for k, v in r.items()}
        if preds:
            from eval.caption import score_captions

            scores = score_captions(preds, refs, tokenize="morpheme")
            self.log("val/CIDEr-D", float(scores["CIDEr-D"]), prog_bar=True)
            self.log("val/BLEU-4", float(scores["BLEU-4"]))
        self._val_preds, self._val_refs = {}, {}

    def configure_optimizers(self) -> dict[str, Any]:
        st = self.stage
        rates = {"projector": st.lr_projector, "vision": st.lr_vision, "decoder": st.lr_lora}
        by_part: dict[str, list[torch.nn.Parameter]] = {k: [] for k in rates}
        for n, p in self.vlm.named_parameters():
            if p.requires_grad:
                by_part[n.split(".", 1)[0]].append(p)
        names = {"decoder": "lora"}  # the decoder trains through its adapters (LoRA) only
        groups = [{"params": ps, "lr": rates[k], "name": names.get(k, k)} for k, ps in by_part.items() if ps]
        opt = torch.optim.AdamW(groups, weight_decay=st.weight_decay, betas=(0.9, 0.999))
        warmup = max(1, int(st.max_steps * st.warmup_ratio))
        sched = LambdaLR(opt, lambda s: warmup_cosine(s, st.max_steps, warmup))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # What was trained, plus a tower fine-tuned earlier (init_from): its config alone cannot rebuild it.
        keep = self.trainable_names()
        tuned = "vlm.vision." if self.tower_tuned else None
        checkpoint["state_dict"] = {
            k: v for k, v in checkpoint["state_dict"].items() if k in keep or (tuned and k.startswith(tuned))
        }
        checkpoint["kovicap"] = {"config": self.config, "rng_cpu": torch.get_rng_state()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        missing = self.trainable_names() - set(checkpoint["state_dict"])
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} trained parameters, e.g. {sorted(missing)[0]}")
        # LoRA dropout draws from the global RNG. Restore it just before the first resumed batch:
        # Lightning draws from it in between (the DataLoader iterator's base seed).
        self._resume_rng = checkpoint["kovicap"]["rng_cpu"]

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if getattr(self, "_resume_rng", None) is not None:
            torch.set_rng_state(self._resume_rng)
            self._resume_rng = None
