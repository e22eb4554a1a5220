"""SIGTERM / SIGINT that stop a run after the current step or batch, and end it with 143 / 130.

`StopSignal` is a Lightning callback (so it installs its handlers after Lightning's own, which would
only log SIGTERM and, in training, exit 0). The first signal is recorded; training sets
`trainer.should_stop` at the end of the step (every rank agrees, so DDP ranks stop together) and the
checkpoint callback then writes the step; prediction stops after the batch its writer has flushed.
A second SIGINT interrupts at once. The run then raises `Interrupted`, which the CLI turns into one
line and the exit code 128 + signal number.
"""

from __future__ import annotations

import signal
from typing import Any

import lightning.pytorch as L

from vlm.util.errors import Interrupted

__all__ = ["Interrupted", "StopSignal", "signal_name"]


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class StopSignal(L.Callback):
    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    # -- handlers ----------------------------------------------------------------------------------
    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user does not want to wait
        if self.signum is None:
            self.signum = signum

    def install(self) -> None:
        for s in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread (e.g. a notebook worker): nothing to install
                return

    def restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}

    # -- Lightning hooks ---------------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.install()

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.install()

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        # Every rank takes part in the vote each step, so a signal delivered to one rank stops them all
        # at the same step (and the collective never waits on a rank that left).
        if trainer.strategy.reduce_boolean_decision(self.signum is not None, all=False):
            trainer.should_stop = True
            if self.signum is None:
                self.signum = signal.SIGTERM

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.restore()
