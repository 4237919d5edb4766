"""Training throughput of `regablate fit` against a plain PyTorch loop, and data rate against both.

Both sides train the same model (the quickstart's, built from configs/quickstart.yaml) on the
same SyntheticScenes batches with the same AdamW + warmup/cosine schedule; the Lightning side
runs through the real CLI (logger, checkpointing, summary and LR monitor on, validation off).
Steps before ``--warmup`` are not timed. Repeats alternate the two sides so that machine noise
hits both; the script prints medians and the ratio.

    python benchmarks/fit_throughput.py [--steps 120] [--repeats 3] [--config configs/quickstart.yaml]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import yaml
from lightning import Callback

from regablate.data import SyntheticScenes
from regablate.lightning_cli import build_cli
from regablate.tasks import Classification
from regablate.tasks.optim import adamw_warmup_cosine


class StepTimer(Callback):
    """Wall time from the end of step ``warmup`` to the end of the last step."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.start = 0.0
        self.end = 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup:
            self.start = time.perf_counter()
        self.end = time.perf_counter()


def load_config(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def build(config: dict) -> tuple[Classification, SyntheticScenes]:
    model_args = dict(config["model"]["init_args"])
    data = SyntheticScenes(**config["data"]["init_args"])
    model = Classification(img_size=data.img_size, **model_args)
    return model, data


def plain_loop(config: dict, steps: int, warmup: int) -> float:
    """Images per second of a hand-written loop doing what `fit` does."""
    torch.manual_seed(0)
    model, data = build(config)
    data.setup("fit")
    hp = model.hparams
    opt = adamw_warmup_cosine(
        model,
        lr=hp.lr,
        weight_decay=hp.weight_decay,
        warmup_steps=hp.warmup_steps,
        total_steps=steps,
        min_lr_ratio=hp.min_lr_ratio,
    )
    optimizer, schedule = opt["optimizer"], opt["lr_scheduler"]["scheduler"]
    model.train()
    loader = iter(data.train_dataloader())
    start = 0.0
    for step in range(steps):
        batch = next(loader)
        optimizer.zero_grad(set_to_none=True)
        loss = model.loss(model(batch["image"]), batch["label"])
        loss.backward()
        optimizer.step()
        schedule.step()
        if step + 1 == warmup:
            start = time.perf_counter()
    return (steps - warmup) * data.hparams.batch_size / (time.perf_counter() - start)


def timed_fit(
    config_path: Path,
    steps: int,
    warmup: int,
    extra_callbacks: list[Callback] | tuple = (),
    overrides: tuple[str, ...] = (),
) -> float:
    """Seconds of the timed steps (after ``warmup``) of `regablate fit`, validation off, ``overrides`` added."""
    timer = StepTimer(warmup)
    with tempfile.TemporaryDirectory() as runs:
        build_cli(
            [
                "fit",
                "--config",
                str(config_path),
                "--trainer.max_steps",
                str(steps),
                "--trainer.limit_val_batches",
                "0",
                "--trainer.enable_progress_bar",
                "false",
                "--trainer.logger.init_args.save_dir",
                runs,
                *overrides,
            ],
            extra_callbacks=[timer, *extra_callbacks],
        )
    return timer.end - timer.start


def lightning_fit(config_path: Path, steps: int, warmup: int, batch_size: int) -> float:
    """Images per second of the real `regablate fit` on the same config."""
    return (steps - warmup) * batch_size / timed_fit(config_path, steps, warmup)


def data_rate(config: dict, batches: int) -> float:
    """Images per second of the training dataloader alone."""
    _, data = build(config)
    data.setup("fit")
    loader = iter(data.train_dataloader())
    next(loader)
    start = time.perf_counter()
    for _ in range(batches):
        next(loader)
    return batches * data.hparams.batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--config", type=Path, default=Path("configs/quickstart.yaml"))
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    config = load_config(args.config)
    batch_size = config["data"]["init_args"]["batch_size"]

    plain, fit, data = [], [], []
    for _ in range(args.repeats):
        plain.append(plain_loop(config, args.steps, args.warmup))
        fit.append(lightning_fit(args.config, args.steps, args.warmup, batch_size))
        data.append(data_rate(config, 50))
    p, f, d = statistics.median(plain), statistics.median(fit), statistics.median(data)
    print(
        f"threads: {torch.get_num_threads()}  steps: {args.steps} (first {args.warmup} untimed)  "
        f"repeats: {args.repeats}"
    )
    print(f"plain PyTorch loop : {p:8.1f} img/s  (runs: {', '.join(f'{x:.0f}' for x in plain)})")
    print(f"regablate fit      : {f:8.1f} img/s  (runs: {', '.join(f'{x:.0f}' for x in fit)})")
    print(f"synthetic data     : {d:8.1f} img/s  (runs: {', '.join(f'{x:.0f}' for x in data)})")
    print(f"fit / plain        : {f / p:.3f}   (target >= 0.95)")
    print(f"data / fit         : {d / f:.1f}x   (target >= 5x)")


if __name__ == "__main__":
    main()
