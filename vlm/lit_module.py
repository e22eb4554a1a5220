"""The one LightningModule: optimisation, schedules, logging and checkpoint contents of a VLM."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as L
import torch
from torch.optim.lr_scheduler import LambdaLR

from vlm.model import VLM


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """Linear warmup to 1, then cosine to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class CaptionModule(L.LightningModule):
    def __init__(
        self,
        vlm: VLM,
        train_cfg: Any,
        config: dict[str, Any] | None = None,
        max_new_tokens: int = 48,
        blind: bool = False,
    ) -> None:
        super().__init__()
        self.vlm = vlm
        self.tcfg = train_cfg
        self.config = config or {}  # the resolved run config, stored in every checkpoint
        self.max_new_tokens = max_new_tokens
        self.blind = bool(blind)
        self.strict_loading = False  # checkpoints hold only the trained parameters
        self._val_preds: dict[str, str] = {}
        self._val_refs: dict[str, list[str]] = {}

    def trainable_names(self) -> set[str]:
        return {n for n, p in self.named_parameters() if p.requires_grad}

    def _feats(self, batch: dict[str, Any]) -> torch.Tensor:
        if self.blind:  # control run: what the encoder makes of all-zero frames, for every video
            return self.blind_feats(batch).to(self.vlm.projector.fc1.weight.dtype)
        feats = batch["feats"] if "feats" in batch else self.vlm.encode(batch["frames"])
        return feats.to(self.vlm.projector.fc1.weight.dtype)

    def blind_feats(self, batch: dict[str, Any]) -> torch.Tensor:
        x = batch["feats"] if "feats" in batch else batch["frames"]
        t = x.shape[1]
        size = self.vlm.vision.image_size
        zeros = torch.zeros(1, t, size[0], size[1], 3, dtype=torch.uint8, device=x.device)
        return self.vlm.encode(zeros).expand(x.shape[0], -1, -1, -1)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.vlm.loss(self._feats(batch), batch["caption"])
        self.log("train/loss", loss, prog_bar=True, on_step=True, batch_size=len(batch["caption"]))
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        feats = self._feats(batch)
        loss = self.vlm.loss(feats, [c[0] for c in batch["captions"]])
        self.log("val/loss", loss, prog_bar=True, batch_size=feats.shape[0], sync_dist=True)
        room = int(self.tcfg.get("val_caption_subset", 0)) - len(self._val_preds)
        if room > 0:  # CIDEr-D on a small held-out subset: generation is the slow part
            preds = self.vlm.generate(feats[:room], max_new_tokens=self.max_new_tokens)
            for video, pred, refs in zip(batch["video"], preds, batch["captions"], strict=False):
                self._val_preds[video], self._val_refs[video] = pred, list(refs)

    def on_validation_epoch_end(self) -> None:
        if self._val_preds:
            from eval.caption import score_captions

            scores = score_captions(self._val_preds, self._val_refs, tokenize="morpheme")
            self.log("val/CIDEr-D", float(scores["CIDEr-D"]), prog_bar=True)
            self.log("val/BLEU-4", float(scores["BLEU-4"]))
        self._val_preds, self._val_refs = {}, {}

    def configure_optimizers(self) -> dict[str, Any]:
        groups = []
        proj = [p for p in self.vlm.projector.parameters() if p.requires_grad]
        rest = [
            p for n, p in self.vlm.named_parameters() if p.requires_grad and not n.startswith("projector.")
        ]
        if proj:
            groups.append({"params": proj, "lr": float(self.tcfg.lr_projector), "name": "projector"})
        if rest:
            groups.append({"params": rest, "lr": float(self.tcfg.lr_lora), "name": "lora"})
        opt = torch.optim.AdamW(groups, weight_decay=float(self.tcfg.weight_decay), betas=(0.9, 0.999))
        total = int(self.tcfg.max_steps)
        warmup = max(1, int(total * float(self.tcfg.warmup_ratio)))
        sched = LambdaLR(opt, lambda s: warmup_cosine(s, total, warmup))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = self.trainable_names()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["kovicap"] = {"config": self.config, "rng_cpu": torch.get_rng_state()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        missing = self.trainable_names() - set(checkpoint["state_dict"])
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} trained parameters, e.g. {sorted(missing)[0]}")
        # LoRA dropout draws from the global RNG. Restore it just before the first resumed batch:
        # Lightning draws from it in between (the DataLoader iterator's base seed).
        self._resume_rng = checkpoint.get("kovicap", {}).get("rng_cpu")

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if getattr(self, "_resume_rng", None) is not None:
            torch.set_rng_state(self._resume_rng)
            self._resume_rng = None
