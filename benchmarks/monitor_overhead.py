"""Cost of OutlierNormMonitor in `regablate fit`: off vs default cadence vs every step, side by side.

All three train the quickstart model through the real CLI (validation off, so only the
every-N-steps measurements count; steps before ``--warmup`` are not timed). Repeats alternate
the variants so that machine noise hits all of them; the script prints median throughputs,
the ratios (time with / time without; targets: <= 1.01 at the default cadence, <= 1.03 every
step) and the cost of one measurement, timed on its own.

    python benchmarks/monitor_overhead.py [--steps 150] [--repeats 3] [--config configs/quickstart.yaml]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fit_throughput import load_config, timed_fit  # noqa: E402

from regablate.callbacks import OutlierNormMonitor  # noqa: E402


class MeasureTimer(OutlierNormMonitor):
    """The monitor, timing each of its measurements."""

    seconds: list[float]

    def measure(self, trainer, pl_module, step) -> None:  # noqa: ANN001
        start = time.perf_counter()
        super().measure(trainer, pl_module, step)
        self.seconds = [*getattr(self, "seconds", []), time.perf_counter() - start]


def fit_seconds(config: Path, steps: int, warmup: int, monitor: OutlierNormMonitor | None) -> float:
    """Wall time of the timed steps of one `regablate fit`."""
    return timed_fit(config, steps, warmup, [monitor] if monitor else [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/quickstart.yaml"))
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    default_every = OutlierNormMonitor().every_n_steps
    variants = {"off": None, f"every {default_every} steps (default)": default_every, "every step": 1}
    times: dict[str, list[float]] = {name: [] for name in variants}
    measures: list[float] = []
    for _ in range(args.repeats):
        for name, every in variants.items():
            monitor = MeasureTimer(every_n_steps=every) if every else None
            times[name].append(fit_seconds(args.config, args.steps, args.warmup, monitor))
            if every == 1:
                measures += monitor.seconds[1:]  # the first runs at train start, cold
    batch_size = load_config(args.config)["data"]["init_args"]["batch_size"]
    timed = args.steps - args.warmup
    base = statistics.median(times["off"])
    print(f"steps: {args.steps} (first {args.warmup} untimed)  repeats: {args.repeats}  batch: {batch_size}")
    for name, values in times.items():
        median = statistics.median(values)
        runs = ", ".join(f"{timed * batch_size / v:.0f}" for v in values)
        print(f"monitor {name:<28}: {timed * batch_size / median:7.1f} img/s  time ratio {median / base:.3f}  (runs: {runs})")
    step = base / timed
    one = statistics.median(measures)
    print(f"one measurement: {one * 1e3:.1f} ms = {one / step:.2f} training steps ({step * 1e3:.1f} ms/step)")
    print(f"implied overhead: every {default_every} steps {1 + one / (step * default_every):.4f}, every step {1 + one / step:.3f}")
    print("targets: default cadence <= 1.01, every step <= 1.03")


if __name__ == "__main__":
    main()
