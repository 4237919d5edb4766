"""Callbacks that keep a run folder ``runs/<experiment>/<run>/`` complete and truthful."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.trainer.states import TrainerFn

from regablate.runs import RunRecord


class RunConfig(SaveConfigCallback):
    """Save the resolved config into the run folder; clean up a folder that a failed start left.

    ``fit`` writes ``config.yaml`` (the file that reproduces the run, overwritten when a run is
    re-run into its folder); ``validate``/``test``/``predict`` write ``<stage>_config.yaml`` so
    they never replace it. The run folder is removed again when the
    run fails before it wrote a checkpoint or a summary, so no half-written run is left behind;
    a folder holding finished work is never touched.
    """

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if getattr(trainer, "fast_dev_run", False) or self.already_saved:
            return
        self.run_dir = Path(trainer.log_dir or ".")
        stage = TrainerFn(stage).value
        if stage != TrainerFn.FITTING.value:
            self.config_filename = f"{stage}_config.yaml"
        super().setup(trainer, pl_module, stage)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        run_dir = getattr(self, "run_dir", None)
        if run_dir is None or not trainer.is_global_zero:
            return
        if not any(run_dir.glob("checkpoints/*.ckpt")) and not RunRecord(run_dir).exists():
            shutil.rmtree(run_dir, ignore_errors=True)


class RunSummary(Callback):
    """Merge the run's final metrics into ``summary.json`` when fit or test ends (rank zero only).

    Keys: every scalar in ``trainer.callback_metrics`` (``val/top1``, ``test/top1``, ...) plus
    ``num_registers``, ``seed``, ``model_name``, ``task``, ``status`` and, after fit,
    ``epoch``, ``global_step``, ``fit_seconds``, ``best_model_score`` (``status`` is ``complete``, or
    ``interrupted`` after Ctrl-C).
    """

    def __init__(self) -> None:
        self._fit_start: float | None = None

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._fit_start = time.perf_counter()

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        extra: dict[str, Any] = {"epoch": trainer.current_epoch, "global_step": trainer.global_step}
        if self._fit_start is not None:
            extra["fit_seconds"] = round(time.perf_counter() - self._fit_start, 3)
        checkpoint = trainer.checkpoint_callback
        if isinstance(checkpoint, ModelCheckpoint) and checkpoint.best_model_score is not None:
            extra["best_model_score"] = float(checkpoint.best_model_score)
        self._write(trainer, pl_module, extra)

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._write(trainer, pl_module, {})

    def _write(self, trainer: Trainer, pl_module: LightningModule, extra: dict[str, Any]) -> None:
        if getattr(trainer, "fast_dev_run", False):
            return
        log_dir = trainer.log_dir  # a collective call under DDP: every rank must make it
        if not trainer.is_global_zero or log_dir is None:
            return
        metrics = {
            name: float(value)
            for name, value in trainer.callback_metrics.items()
            if getattr(value, "numel", lambda: 1)() == 1
        }
        hparams = pl_module.hparams
        seed = os.environ.get("PL_GLOBAL_SEED")
        values: dict[str, Any] = {
            **metrics,
            **extra,
            "task": type(pl_module).__name__,
            "model_name": hparams.get("model_name"),
            "num_registers": hparams.get("num_registers"),
            "seed": int(seed) if seed is not None else None,
            "status": "interrupted" if trainer.interrupted else "complete",
        }
        RunRecord(log_dir).update(values)
