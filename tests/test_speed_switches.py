"""The tasks' ``compile`` and ``grad_checkpointing`` switches: same results as without, the monitor
keeps working without recompiling, and ``compile`` is refused in one line where it cannot run."""

from __future__ import annotations

import pytest
import torch
from lightning import Callback, seed_everything
from torch._dynamo.utils import counters
from torch._inductor import cpp_builder
from torch._inductor.exc import InvalidCxxCompiler

from regablate.callbacks.outliers import OutlierNormMonitor
from regablate.cli import main
from regablate.data import SyntheticScenes
from regablate.models.compiled import compile_unavailable
from regablate.tasks import DINO, Classification
from tests.conftest import quiet_trainer, tiny_fit_args
from tests.test_dino import task as tiny_dino

SIZES = {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}


def test_grad_checkpointing_is_on_in_the_backbones_that_train_only():
    dino = tiny_dino(grad_checkpointing=True)
    assert dino.student.grad_checkpointing and not dino.backbone.grad_checkpointing  # the teacher runs without grad
    frozen = Classification(
        num_classes=4, img_size=32, model_kwargs=SIZES, freeze_backbone=True, grad_checkpointing=True
    )
    assert not frozen.backbone.grad_checkpointing
    assert not tiny_dino().student.grad_checkpointing


def test_grad_checkpointing_gives_dino_the_same_loss_and_gradients():
    results = []
    for on in (False, True):
        torch.manual_seed(0)
        dino = tiny_dino(grad_checkpointing=on).train()
        images = torch.randn(4, 3, 32, 32)
        out = dino._shared_step(images, 0, torch.Generator().manual_seed(0))
        out["loss"].backward()
        results.append((out["loss"].detach(), [p.grad.clone() for p in dino.student.parameters()]))
    (loss, grads), (loss_ckpt, grads_ckpt) = results
    torch.testing.assert_close(loss_ckpt, loss)
    for grad, grad_ckpt in zip(grads, grads_ckpt):
        torch.testing.assert_close(grad_ckpt, grad)


def test_compiled_blocks_keep_the_modules_and_checkpoint_keys():
    torch.manual_seed(0)
    eager = tiny_dino()
    compiled = tiny_dino(compile=True)
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    assert [type(m).__name__ for m in compiled.modules()] == [type(m).__name__ for m in eager.modules()]
    assert isinstance(compiled, DINO) and compiled.hparams.compile and not eager.hparams.compile


def no_cpp_compiler() -> str:
    raise InvalidCxxCompiler()


@pytest.mark.parametrize(
    "probe, patch, message",
    [
        (cpp_builder, ("get_cpp_compiler", no_cpp_compiler), "torch.compile found no C++ compiler for inductor"),
        (torch._dynamo, ("is_dynamo_supported", lambda: False), "torch.compile does not support Python"),
    ],
)
def test_compile_where_it_cannot_run_is_refused_in_one_line_before_training(
    tmp_path, capsys, monkeypatch, probe, patch, message
):
    monkeypatch.setattr(probe, *patch)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *tiny_fit_args(tmp_path, "--model.init_args.compile", "true")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("regablate: error: model.init_args.compile is true but ") and message in err[-1], err
    assert err[-1].endswith("turn it off with --model.init_args.compile false")
    assert "Traceback" not in "\n".join(err)
    assert not (tmp_path / "runs").exists(), "refused before anything is written"


def test_compile_can_run_here():
    assert compile_unavailable() is None, "this machine has a C++ compiler: the slow test below compiles"


class Record(OutlierNormMonitor):
    """The monitor at every step (a fixed-image scan and a reading of the training forward), keeping what it
    measured, the loss of each step and the graphs compiled so far."""

    def __init__(self) -> None:
        super().__init__(every_n_steps=1, num_images=4, histograms=False, train_batch_every_n_steps=1)
        self.losses: list[float] = []
        self.graphs: list[int] = []
        self.scans: list[dict[str, float]] = []
        self.readings: list[dict[int, torch.Tensor]] = []

    def measure(self, trainer, pl_module, step) -> None:
        super().measure(trainer, pl_module, step)
        self.scans.append(self.latest)

    def log_train_batch(self, trainer, layout, norms) -> None:
        self.readings.append(norms)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self.losses.append(float(outputs["loss"]))
        self.graphs.append(counters["stats"]["unique_graphs"])


def fit_five_steps(**switches) -> Callback:
    seed_everything(0)
    model = Classification(num_registers=2, num_classes=4, img_size=32, model_kwargs=SIZES, warmup_steps=1, **switches)
    record = Record()
    data = SyntheticScenes(img_size=32, num_classes=4, train_size=80, val_size=16, batch_size=16)
    quiet_trainer(5, callbacks=[record]).fit(model, data)
    return record


@pytest.mark.slow
def test_a_compiled_checkpointed_fit_matches_eager_and_the_monitor_never_recompiles():
    torch._dynamo.reset()
    counters.clear()
    eager = fit_five_steps()
    compiled = fit_five_steps(compile=True, grad_checkpointing=True)
    assert compiled.losses == pytest.approx(eager.losses, rel=1e-5)
    # One training graph, shared by the blocks, compiled at the first step; the monitor's scans (run eagerly)
    # and its hooks on the compiled blocks at every step add none.
    assert compiled.graphs == [1] * 5 and not counters["graph_break"], (compiled.graphs, counters["graph_break"])
    assert len(compiled.readings) == len(eager.readings) == 5
    for got, want in zip(compiled.readings, eager.readings):
        assert got.keys() == want.keys()
        for block in want:
            torch.testing.assert_close(got[block], want[block], rtol=1e-4, atol=1e-4)
    assert len(compiled.scans) == len(eager.scans) == 6  # train start and every step
    for got, want in zip(compiled.scans, eager.scans):
        assert got == pytest.approx(want, rel=1e-4, abs=1e-5)
