"""Cost of TimeLimitCheckpoint per training step: its check at every batch end, against the step itself.

At each batch end the callback asks every rank whether any got the time-limit signal (one boolean
all-reduce under DDP; nothing to reduce on one device). Timing the all-reduce alone would also
count the wait for the slower rank, which the step's gradient all-reduce pays anyway; so the
check is made *paired*: on half of the steps only (two on, two off), inside one real
`regablate fit` of the quickstart model (validation off), and the steps that end with a check are
compared with their neighbours that do not. Printed: median step times, the time ratio (with / without the check),
and the check's own median time. Target: <= 1.01.

    python benchmarks/time_limit_overhead.py [--steps 300] [--devices 2]

With ``--devices 2`` the fit is 2 DDP processes on CPU (gloo); Lightning's launcher re-runs this
script for rank 1, and rank 0 prints.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from lightning import Callback

sys.path.insert(0, str(Path(__file__).resolve().parent))

from regablate.callbacks import TimeLimitCheckpoint
from regablate.lightning_cli import build_cli


def checked(step: int) -> bool:
    """Steps that end with a check: two on, two off, so that each half holds as many odd steps as even ones
    (checking every second step measured a 4 % odd/even difference on one device, where the check costs 4 us)."""
    return (step // 2) % 2 == 1


class EverySecondStep(TimeLimitCheckpoint):
    """The callback, checking on half of the steps only (the same steps on every rank), and timing each check."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if checked(trainer.global_step):
            started = time.perf_counter()
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            self.seconds.append(time.perf_counter() - started)


class PairedStepTimes(Callback):
    """Wall time of each step after ``warmup`` (batch start to batch start), filed by whether it ended with a check."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.last = warmup, None
        self.times: dict[bool, list[float]] = {True: [], False: []}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self.last is not None and trainer.global_step > self.warmup:
            self.times[checked(trainer.global_step)].append(now - self.last)  # the step that just ended
        self.last = now


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--config", type=Path, default=Path("configs/quickstart.yaml"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--devices", type=int, default=2)
    args = parser.parse_args()
    check, steps = EverySecondStep(), PairedStepTimes(args.warmup)
    ddp = ["--trainer.strategy", "ddp"] if args.devices > 1 else []
    with tempfile.TemporaryDirectory() as runs:
        cli = build_cli(
            [
                "fit",
                "--config",
                str(args.config),
                "--trainer.max_steps",
                str(args.steps),
                "--trainer.limit_val_batches",
                "0",
                "--trainer.enable_progress_bar",
                "false",
                "--trainer.accelerator",
                "cpu",
                "--trainer.devices",
                str(args.devices),
                *ddp,
                "--trainer.logger.init_args.save_dir",
                runs,
                "--time_limit.signal_name",
                "null",  # the CLI's own instance off: the timed one below does the work
            ],
            extra_callbacks=[check, steps],
        )
    if not cli.trainer.is_global_zero:
        return
    checked, unchecked = (statistics.median(steps.times[flag]) for flag in (True, False))
    itself = statistics.median(check.seconds)
    print(
        f"{args.devices} device(s), {sum(map(len, steps.times.values()))} steps: "
        f"with the check {checked * 1e3:.2f} ms, without {unchecked * 1e3:.2f} ms (medians); "
        f"time ratio with/without {checked / unchecked:.4f}; the check itself {itself * 1e3:.3f} ms "
        "(median; under DDP it includes waiting for the slower rank)"
    )


if __name__ == "__main__":
    main()
