"""``TimeLimitCheckpoint`` and the resumable training sampler: a fit signalled near its time limit saves
``last.ckpt`` at a step boundary, exits 3, and the fit resumed from it ends where an uninterrupted one does."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch

from regablate.callbacks import TimeLimitCheckpoint
from regablate.cli import main
from regablate.errors import EXIT_TIME_LIMIT, RegablateError
from tests.conftest import tiny_fit_args

# Two epochs of 4 batches (64 scenes, batch 16), validation and epoch-end checkpoints every 4 steps.
STEPS = ("--trainer.max_steps", "8", "--trainer.val_check_interval", "4")
RESULTS = ("val/loss", "val/top1", "train/loss", "global_step", "epoch")


def fit(tmp_path: Path, name: str, *extra: str) -> dict:
    main(["fit", *tiny_fit_args(tmp_path, *STEPS, "--trainer.logger.init_args.name", name, *extra)])
    return json.loads((tmp_path / "runs" / name / "r2_s0" / "summary.json").read_text())


def signal_config(tmp_path: Path, step: int) -> Path:
    path = tmp_path / f"signal_at_{step}.yaml"
    path.write_text(
        "trainer:\n  callbacks:\n    - class_path: tests.signals.SignalAtStep\n"
        f"      init_args: {{step: {step}, marker: {tmp_path / f'signalled_{step}'}}}\n"
    )
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    return fit(tmp_path_factory.mktemp("reference"), "reference")


@pytest.mark.parametrize("step", [2, 4, 5])  # mid-epoch, at the epoch's end, mid-epoch after a validation
def test_signalled_fit_saves_exits_and_resumes_to_the_uninterrupted_result(tmp_path, reference, step):
    config = signal_config(tmp_path, step)
    with pytest.raises(SystemExit) as stopped:
        fit(tmp_path, "cut", "--config", str(config))
    assert stopped.value.code == EXIT_TIME_LIMIT
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # the handler is gone with the fit
    run = tmp_path / "runs" / "cut" / "r2_s0"
    saved = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert saved["global_step"] == step  # saved at the end of the step that saw the signal, not later
    assert not list(tmp_path.rglob("hpc_ckpt_*.ckpt")) and not list(Path.cwd().glob("hpc_ckpt_*.ckpt"))
    assert not (run / "summary.json").exists()  # a fit cut short is not complete: it writes no summary
    resumed = fit(tmp_path, "cut", "--config", str(config), "--ckpt_path", "last")
    for key in RESULTS:
        assert resumed[key] == reference[key], key  # the same batches in the same order: the same numbers


def test_unknown_signal_is_refused():
    with pytest.raises(RegablateError, match="unknown signal 'SIGNOPE'"):
        TimeLimitCheckpoint("SIGNOPE")
