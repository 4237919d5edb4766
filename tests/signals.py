"""Callbacks that stand in for a time limit in tests: they signal a fit, or hold it until it is signalled.

Used by class path from run configs (``tests.signals.SignalAtStep``), so the ``regablate``
process that loads them needs the repository on its ``PYTHONPATH``.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

from lightning import Callback, LightningModule, Trainer


class SignalAtStep(Callback):
    """Send SIGUSR1 to this process at the end of step ``step``, once (``marker`` records that it did)."""

    def __init__(self, step: int, marker: str) -> None:
        self.step, self.marker = step, Path(marker)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self.step and trainer.is_global_zero and not self.marker.exists():
            self.marker.write_text(str(self.step))
            os.kill(os.getpid(), signal.SIGUSR1)


class WaitForSignal(Callback):
    """Hold the fit at the end of step ``step`` until its ``TimeLimitCheckpoint`` has noted the signal.

    The first time only: ``marker`` is written when the fit gets there (the test then signals the
    job), and a resumed fit, which finds the marker, goes straight on.
    """

    def __init__(self, step: int, marker: str, timeout_s: float = 180) -> None:
        self.step, self.marker, self.timeout_s = step, Path(marker), timeout_s

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step != self.step or self.marker.exists():
            return
        trainer.strategy.barrier("WaitForSignal")  # every rank has checked the marker before rank 0 writes it
        if trainer.is_global_zero:
            self.marker.write_text(str(self.step))
        deadline = time.monotonic() + self.timeout_s
        while not any(getattr(callback, "requested", False) for callback in trainer.callbacks):
            if time.monotonic() > deadline:
                raise RuntimeError(f"WaitForSignal: no signal within {self.timeout_s} s")
            time.sleep(0.05)


class Segfault(Callback):
    """Crash the process with a segmentation fault when training starts (a stage that dies by a signal)."""

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        import ctypes

        ctypes.string_at(0)  # reads address 0: SIGSEGV


class HoldAtStep(Callback):
    """Hold the fit at the end of step ``step`` (``marker`` says it got there) until the test kills it.

    The first time only: a resumed fit, which finds the marker, goes straight on.
    """

    def __init__(self, step: int, marker: str, timeout_s: float = 300) -> None:
        self.step, self.marker, self.timeout_s = step, Path(marker), timeout_s

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self.step and not self.marker.exists():
            self.marker.write_text(str(self.step))
            time.sleep(self.timeout_s)
