"""2-process DDP on CPU (gloo) gives what one process gives on the same global batch.

DDP re-executes the command line, so each run is a real `python -m regablate` subprocess.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import REPO, TINY_MODEL, run_regablate, write_source_checkpoint

pytestmark = pytest.mark.slow

SIZES = {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}


def fit(config: str, save_dir: Path, name: str, devices: int, *extra: str) -> dict:
    batch = str(16 // devices)
    args = [
        "fit",
        "--config",
        str(REPO / "tests" / "configs" / config),
        "--trainer.logger.init_args.save_dir",
        str(save_dir),
        "--trainer.logger.init_args.name",
        name,
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        str(devices),
        "--data.init_args.batch_size",
        batch,
        "--trainer.max_steps",
        "3",
        *extra,
    ]
    if devices > 1:
        args += ["--trainer.strategy", "ddp"]
    run_regablate(*args, timeout=300)
    return json.loads((save_dir / name / "r2_s0" / "summary.json").read_text())


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return write_source_checkpoint(tmp_path_factory.mktemp("src") / "source.safetensors", TINY_MODEL, 32, SIZES)


def test_distillation_ddp_matches_one_process(tmp_path, source):
    extra = ("--model.checkpoint", str(source), "--model.init_args.num_views", "2")
    one = fit("tiny_distill.yaml", tmp_path, "one", 1, *extra)
    two = fit("tiny_distill.yaml", tmp_path, "two", 2, *extra)
    assert two["status"] == one["status"] == "complete"
    assert two["global_step"] == one["global_step"] == 3
    # Same global batches, gradients averaged over ranks: the same model, so the same validation loss.
    assert two["val/loss"] == pytest.approx(one["val/loss"], rel=1e-4)
    assert two["val/patch_cos"] == pytest.approx(one["val/patch_cos"], rel=1e-4)


def test_dino_ddp_matches_one_process(tmp_path):
    one = fit("tiny_dino.yaml", tmp_path, "one", 1)
    two = fit("tiny_dino.yaml", tmp_path, "two", 2)
    assert two["status"] == one["status"] == "complete"
    # Crops are drawn for the global batch and dealt out like the samples: the same crops, the same model.
    assert two["val/loss"] == pytest.approx(one["val/loss"], rel=1e-3)
    assert two["train/teacher_momentum"] == pytest.approx(one["train/teacher_momentum"])


def test_monitor_under_ddp_writes_its_summary(tmp_path):
    """The monitor measures on rank zero; its fit-end summary must not leave the other rank behind."""
    every_step = tmp_path / "every_step.yaml"
    every_step.write_text(
        "trainer:\n  callbacks+:\n    - class_path: regablate.callbacks.OutlierNormMonitor\n"
        "      init_args: {every_n_steps: null, train_batch_every_n_steps: 1}\n"
    )
    summary = fit(
        "tiny.yaml",
        tmp_path,
        "monitored",
        2,
        "--config",
        str(REPO / "configs" / "monitor.yaml"),
        "--config",
        str(every_step),
    )
    assert summary["status"] == "complete"
    assert "artifacts/outlier_frac" in summary and "artifacts/outlier_frac/block_01" in summary
    events = EventAccumulator(str(tmp_path / "monitored" / "r2_s0"))
    events.Reload()
    # Training-batch readings: rank zero's batch, once per step, never twice.
    assert [e.step for e in events.Scalars("artifacts/train_batch/outlier_frac")] == [0, 1, 2]
