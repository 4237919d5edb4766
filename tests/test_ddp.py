"""2-process DDP on CPU (gloo) gives what one process gives on the same global batch.

DDP re-executes the command line, so each run is a real `python -m regablate` subprocess.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
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
    """DINOv2's recipe (tiny_dino.yaml: iBOT with its own head, KoLeo, Sinkhorn-Knopp, the views) on 2 ranks."""
    one = fit("tiny_dino.yaml", tmp_path, "one", 1)
    two = fit("tiny_dino.yaml", tmp_path, "two", 2)
    assert two["status"] == one["status"] == "complete"
    # Crops, views and masks are drawn for the global batch and dealt out like the samples, Sinkhorn-Knopp
    # sums over both ranks, KoLeo sees the whole batch: the same targets, the same losses, the same model.
    for key in ("train/dino_loss", "train/ibot_loss", "train/koleo_loss", "val/loss"):
        assert two[key] == pytest.approx(one[key], rel=1e-3), key
    assert two["train/teacher_momentum"] == pytest.approx(one["train/teacher_momentum"])


def scalars(run_dir: Path, tag: str) -> dict[int, float]:
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return {event.step: event.value for event in events.Scalars(tag)}


def test_dino_head_warmup_under_ddp_matches_one_process_step_by_step(tmp_path):
    """The issue's command: 2 warm-up steps (backbone frozen), then 3 steps that train it, on 2 ranks."""
    extra = ("--model.init_args.head_warmup_steps", "2", "--trainer.max_steps", "5")
    one = fit("tiny_dino.yaml", tmp_path, "one", 1, *extra)
    two = fit("tiny_dino.yaml", tmp_path, "two", 2, *extra)
    assert two["status"] == one["status"] == "complete" and two["global_step"] == one["global_step"] == 5
    # The losses are the global batch's: step by step, 2 ranks give what one process gives.
    for tag in ("train/loss", "train/dino_loss", "train/ibot_loss", "train/koleo_loss"):
        losses_one, losses_two = (scalars(tmp_path / name / "r2_s0", tag) for name in ("one", "two"))
        assert sorted(losses_one) == sorted(losses_two) == [0, 1, 2, 3, 4]
        for step, loss in losses_one.items():
            assert losses_two[step] == pytest.approx(loss, rel=1e-4), (tag, step)
    weights = [
        torch.load(tmp_path / name / "r2_s0" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
        for name in ("one", "two")
    ]
    assert weights[0].keys() == weights[1].keys()
    for key, value in weights[0].items():
        got = weights[1][key]
        if key.endswith("attn.qkv.bias"):
            # The key bias's true gradient is 0 (softmax ignores a shift shared by all keys): what it
            # gets is float noise, which differs between 1 and 2 processes and which Adam scales up to
            # steps of ~lr. Every other parameter must agree.
            width = value.shape[0] // 3
            value, got = torch.cat([value[:width], value[2 * width :]]), torch.cat([got[:width], got[2 * width :]])
        torch.testing.assert_close(got, value, rtol=1e-4, atol=1e-6, msg=key)
    # Steps 2-4 trained the backbone: the student moved away from the frozen teacher's start.
    student = {k: v for k, v in weights[0].items() if k.startswith("student.")}
    assert any(not torch.equal(v, weights[0]["backbone." + k[len("student.") :]]) for k, v in student.items())


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
