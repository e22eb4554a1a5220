"""The CLIs silence library banners before they import Lightning (lazily, so bad input fails fast); the
silencing must survive that import, which resets Lightning's package loggers to INFO. Only a fresh
process shows it: inside pytest Lightning is long imported."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]

FIT = """
import logging, torch
logging.basicConfig()  # as Hydra does: the root logger has a handler
from vlm.util.cli import quiet_libraries
quiet_libraries(False)
import lightning.pytorch as L  # imported after, as train.py, vlm.caption and vlm.demo do

class M(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 1)
    def training_step(self, batch, i):
        return self.lin(batch[0]).sum()
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), 0.1)

L.seed_everything(0)
data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, 2)), batch_size=2)
L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
          enable_model_summary=False, max_steps=2).fit(M(), data)
print("fit done")
"""


def test_banners_stay_silent_when_lightning_is_imported_after():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", FIT], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "fit done" in r.stdout, r.stderr[-2000:]
    for banner in ("GPU available", "TPU available", "Tip:", "Seed set", "`Trainer.fit` stopped"):
        assert banner not in r.stdout + r.stderr, banner
