"""``TimeLimitCheckpoint``: when a job's time is nearly up, save ``last.ckpt`` at a step boundary and stop.

Slurm sends a signal N seconds before a job's time limit when the job asks for it
(``sbatch --signal=USR1@N``; the sweep's Slurm launcher does). This callback only *notes* the
signal. At the next training-batch end every rank learns whether any rank got it (one boolean
all-reduce per step, the way Lightning already shares SIGTERM), all ranks save
``checkpoints/last.ckpt`` together, and the process exits with ``EXIT_TIME_LIMIT``. The launcher
then requeues the job, whose fit resumes from that checkpoint (``--ckpt_path last``).

Why not Lightning's own Slurm auto-requeue: its SIGUSR1 handler saves ``hpc_ckpt_N.ckpt`` *inside*
the signal handler, i.e. at whatever bytecode the main thread was running (halfway through an
optimiser step, say), and on each DDP rank at a different point of the step, where the save's
barrier can meet another rank's gradient all-reduce. Saving at the batch end on every rank at
once is a checkpoint Lightning resumes exactly. So this callback turns Lightning's off
(``SLURMEnvironment.auto_requeue = False``) and installs its own handler when training starts.
A signal that comes earlier (while the fit starts up) ends the process as SIGUSR1 does; the
launcher requeues that job all the same, and it resumes from the previous checkpoint.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from lightning import Callback, LightningModule, Trainer
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from regablate.errors import EXIT_TIME_LIMIT, RegablateError

LAST_CHECKPOINT = "last.ckpt"


class TimeLimitCheckpoint(Callback):
    """On ``signal_name`` (default SIGUSR1), save ``checkpoints/last.ckpt`` at the next batch end and exit 3.

    Args:
        signal_name: the signal that announces the time limit (``sbatch --signal=USR1@N`` sends
            SIGUSR1), or None to turn the callback off.
    """

    def __init__(self, signal_name: str | None = "SIGUSR1") -> None:
        self.signum: signal.Signals | None = None
        if signal_name is not None:
            try:
                self.signum = signal.Signals[signal_name]
            except KeyError:
                raise RegablateError(
                    f"time_limit.signal_name: unknown signal {signal_name!r} (e.g. SIGUSR1, SIGUSR2)"
                ) from None
        self.requested = False
        self._previous: Any = None
        self._installed = False

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        environment = getattr(trainer.strategy, "cluster_environment", None)
        if stage == "fit" and self.signum is not None and isinstance(environment, SLURMEnvironment):
            environment.auto_requeue = False  # this callback handles the time limit (see the module's docstring)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.signum is None or getattr(trainer, "fast_dev_run", False):
            return
        if threading.current_thread() is not threading.main_thread():
            return  # signals reach only the main thread; nothing to install elsewhere
        if not isinstance(trainer.checkpoint_callback, ModelCheckpoint):
            rank_zero_warn("TimeLimitCheckpoint: no ModelCheckpoint to save last.ckpt with; the time limit will end it")
            return
        self.requested = False
        self._previous = signal.signal(self.signum, self._note)
        self._installed = True

    def _note(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._installed:
            return
        if not trainer.strategy.reduce_boolean_decision(self.requested, all=False):
            return
        checkpoint = trainer.checkpoint_callback
        if not isinstance(checkpoint, ModelCheckpoint) or self.signum is None:
            return  # never installed without both (setup)
        path = Path(checkpoint.dirpath or trainer.default_root_dir) / LAST_CHECKPOINT
        trainer.save_checkpoint(path)
        rank_zero_info(
            f"regablate: {self.signum.name} (time limit near): saved {path} at step {trainer.global_step}; "
            f"exiting with code {EXIT_TIME_LIMIT} so the job is requeued"
        )
        raise SystemExit(EXIT_TIME_LIMIT)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._restore()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._restore()  # Lightning skips the teardown hooks after an exception (our SystemExit included)

    def _restore(self) -> None:
        if self._installed and self.signum is not None:
            signal.signal(self.signum, self._previous)
            self._installed = False
