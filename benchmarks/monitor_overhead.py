"""Cost of OutlierNormMonitor in `regablate fit`, measured step by step inside one run.

End-to-end fits here vary by +-10 % from run to run, far more than the 1-3 % this measures, so
each mode is timed *paired*: one fit of the quickstart model through the real CLI (validation
off) with the monitor measuring every second step, and the wall time of each step (training
plus the callbacks at its end) split into steps it measured and steps it did not. Neighbouring
steps see the same machine state, so their ratio is stable. Modes:

* ``fixed images``: a full fixed-image scan (a forward of ``num_images`` images, every block's
  statistics, the evidence, histograms) after the step (``every_n_steps``);
* ``training batch``: norms read by hooks from the training forward, their statistics and
  logging (``train_batch_every_n_steps``).

Printed per mode: median step times, the cost of one measurement, and the implied time ratio
(with / without) at every step and at the default cadence. Targets: the default cadence (a scan
every 100 steps) <= 1.01; every step <= 1.03 (the training-batch mode is the every-step mode).

    python benchmarks/monitor_overhead.py [--steps 300] [--config configs/quickstart.yaml] [--model NAME] [--threads 1]

``--model`` swaps the config's timm model (its sizes stay the config's), e.g. a DINOv3 (Eva, RoPE).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from lightning import Callback

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fit_throughput import load_config, timed_fit

from regablate.callbacks import OutlierNormMonitor


class NotingMonitor(OutlierNormMonitor):
    """The monitor, noting whether it measured anything during the current training batch."""

    measured = False

    def measure(self, trainer, pl_module, step) -> None:
        self.measured = True
        super().measure(trainer, pl_module, step)

    def log_train_batch(self, trainer, num_prefix, norms) -> None:
        self.measured = True
        super().log_train_batch(trainer, num_prefix, norms)


class PairedStepTimer(Callback):
    """Wall time of each step after ``warmup``, filed by whether ``monitor`` measured in it."""

    def __init__(self, monitor: NotingMonitor, warmup: int) -> None:
        self.monitor, self.warmup = monitor, warmup
        self.last: float | None = None
        self.times: dict[bool, list[float]] = {True: [], False: []}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self.last is not None and trainer.global_step > self.warmup:
            self.times[self.monitor.measured].append(now - self.last)
        self.monitor.measured = False
        self.last = now


def paired_step_times(
    config: Path, steps: int, warmup: int, overrides: tuple[str, ...] = (), **monitor_args: int | None
) -> tuple[float, float]:
    """Median seconds of a step with and without a measurement, from one fit measuring every second step."""
    monitor = NotingMonitor(**monitor_args)
    timer = PairedStepTimer(monitor, warmup)
    timed_fit(config, steps, warmup, [monitor, timer], overrides)
    return statistics.median(timer.times[True]), statistics.median(timer.times[False])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--config", type=Path, default=Path("configs/quickstart.yaml"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--model", default=None, help="timm model replacing the config's")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = ("--model.model_name", args.model) if args.model else ()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    default_every = OutlierNormMonitor().every_n_steps
    modes = {
        "fixed images": {"every_n_steps": 2},
        "training batch": {"every_n_steps": None, "train_batch_every_n_steps": 2},
    }
    batch_size = load_config(args.config)["data"]["init_args"]["batch_size"]
    print(
        f"{args.config} ({args.model or 'its model'}): {args.steps} steps of {batch_size} images "
        f"(first {args.warmup} untimed), "
        "every second step measured"
    )
    for name, monitor_args in modes.items():
        with_, without = paired_step_times(args.config, args.steps, args.warmup, overrides, **monitor_args)
        extra = with_ - without
        print(
            f"{name:<15}: step {without * 1e3:6.1f} ms, measured step {with_ * 1e3:6.1f} ms -> "
            f"one measurement {extra * 1e3:5.1f} ms = {extra / without:.3f} step; time ratio every step "
            f"{with_ / without:.3f}, every {default_every} steps {1 + extra / without / default_every:.4f}"
        )
    print(f"targets: default cadence (a fixed-image scan every {default_every} steps) <= 1.01; every step <= 1.03")


if __name__ == "__main__":
    main()
