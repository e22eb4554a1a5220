"""SIGTERM / SIGINT that stop a run after the current step or batch, and end it with 143 / 130.

`StopSignal` is installed when a run starts (so a signal during model loading is not lost) and again,
as a Lightning callback, once training or prediction starts (after Lightning's own handler, which would
only log SIGTERM in prediction and end training with exit 0). The first signal is recorded; training
sets `trainer.should_stop` at the end of the step (every rank takes part in the vote, so DDP ranks stop
together) and the checkpoint callback then writes that step; prediction stops after the batch its
writer has flushed. A second SIGINT stops at once. The run then raises `Interrupted`, which the CLI
turns into one line and the exit code 128 + signal number.
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
        self._previous: dict[int, Any] | None = None

    # -- handlers ----------------------------------------------------------------------------------
    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise Interrupted(
                signum,
                "interrupted twice (SIGINT): stopped at once; the last checkpoint or line on disk is where a rerun resumes",
            )
        if self.signum is None:
            self.signum = signum

    def install(self) -> None:
        """Take over SIGTERM and SIGINT (the handlers found the first time are restored by `restore`)."""
        try:
            previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        except ValueError:  # not the main thread (e.g. a notebook worker): nothing to install
            return
        if self._previous is None:
            self._previous = previous

    def restore(self) -> None:
        if self._previous is not None:
            for s, h in self._previous.items():
                signal.signal(s, h)
            self._previous = None

    # -- Lightning hooks ---------------------------------------------------------------------------
    def _take_over(self, trainer: L.Trainer) -> None:
        self.install()  # replaces the handler Lightning registered when the run started
        # Lightning's SIGTERM notifier may have fired before we took over; the stop is ours to make.
        trainer._signal_connector.received_sigterm = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._take_over(trainer)

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._take_over(trainer)

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        # Every rank takes part in the vote each step, so a signal delivered to one rank stops them all
        # at the same step (and the collective never waits on a rank that left).
        if trainer.strategy.reduce_boolean_decision(self.signum is not None, all=False):
            trainer.should_stop = True
            if self.signum is None:
                self.signum = signal.SIGTERM
