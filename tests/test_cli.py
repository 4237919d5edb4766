"""`regablate fit/validate/test/predict` end to end on a tiny model, and its errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import timm
import torch
import yaml
from safetensors.torch import save_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from regablate.cli import main
from regablate.lightning_cli import build_cli
from regablate.tasks import Classification
from tests.conftest import TINY, TINY_MODEL, run_regablate, tiny_fit_args


def run_dir(tmp_path: Path, registers: int = 2) -> Path:
    return tmp_path / "runs" / "tiny" / f"r{registers}_s0"


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> Path:
    """One finished tiny fit, shared by the tests that only read its run folder (see ``own_run``)."""
    tmp_path = tmp_path_factory.mktemp("fit")
    main(["fit", *tiny_fit_args(tmp_path)])
    return run_dir(tmp_path)


@pytest.fixture
def own_run(fitted, tmp_path) -> tuple[Path, list[str]]:
    """A copy of the finished fit for a test that writes into its run folder, and the arguments that point there."""
    copy = run_dir(tmp_path)
    shutil.copytree(fitted, copy)
    return copy, ["--trainer.logger.init_args.save_dir", str(tmp_path / "runs")]


def test_fit_writes_a_complete_run_folder(fitted):
    assert (fitted / "config.yaml").is_file()
    assert (fitted / "checkpoints" / "last.ckpt").is_file()
    assert len(list((fitted / "checkpoints").glob("best-*.ckpt"))) == 1
    summary = json.loads((fitted / "summary.json").read_text())
    assert summary["status"] == "complete"
    assert summary["num_registers"] == 2 and summary["seed"] == 0
    assert summary["global_step"] == 4 and summary["task"] == "Classification"
    assert 0.0 <= summary["val/top1"] <= 1.0 and summary["fit_seconds"] > 0
    assert not list(fitted.glob(".summary.json.*")), "no temp file left behind"
    events = EventAccumulator(str(fitted))
    events.Reload()
    assert {"train/loss", "val/top1", "val/loss"} <= set(events.Tags()["scalars"])


def test_saved_config_reproduces_the_run(own_run):
    run, into_copy = own_run
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"]["init_args"]["num_registers"] == 2
    assert config["trainer"]["logger"]["init_args"]["version"] == "r2_s0"
    first = json.loads((run / "summary.json").read_text())
    # Re-running the saved config into the same folder must work and give the same numbers.
    main(["fit", "--config", str(run / "config.yaml"), *into_copy])
    again = json.loads((run / "summary.json").read_text())
    assert again["val/top1"] == first["val/top1"]
    assert again["train/loss"] == pytest.approx(first["train/loss"], rel=1e-5)


def test_test_subcommand_adds_to_the_summary(own_run):
    run, into_copy = own_run
    before = (run / "config.yaml").read_text()
    # "best" resolves through the run folder, in a process that did not train.
    cli = build_cli(["test", "--config", str(run / "config.yaml"), *into_copy, "--ckpt_path", "best"])
    assert cli.trainer.num_test_batches == [1]  # tiny.yaml's limit_test_batches: 1 batch of its 2, not 100%
    summary = json.loads((run / "summary.json").read_text())
    assert "test/top1" in summary and "val/top1" in summary
    assert (run / "test_config.yaml").is_file()
    assert (run / "config.yaml").read_text() == before, "test must not replace the fit config"


def test_validate_and_predict_run(own_run):
    run, into_copy = own_run
    config = ["--config", str(run / "config.yaml"), *into_copy]
    validate = build_cli(["validate", *config, "--ckpt_path", str(run / "checkpoints" / "last.ckpt")])
    assert validate.trainer.num_val_batches == [1]  # tiny.yaml's limit_val_batches: 1 batch of its 2, not 100%
    assert (run / "validate_config.yaml").is_file()
    cli = build_cli(["predict", *config, "--ckpt_path", "last"])
    assert (run / "predict_config.yaml").is_file()
    # The predictions are the last checkpoint's model on the test split, batch by batch.
    model = Classification.load_from_checkpoint(run / "checkpoints" / "last.ckpt").eval()
    batches = list(cli.datamodule.predict_dataloader())
    predictions = cli.trainer.predict_loop.predictions
    assert len(predictions) == len(batches) > 0
    for predicted, batch in zip(predictions, batches):
        with torch.no_grad():
            expected = model(batch["image"]).softmax(dim=-1)
        torch.testing.assert_close(predicted["probs"], expected)
        assert torch.equal(predicted["pred"], expected.argmax(dim=-1))
        assert predicted["probs"].sum(dim=-1).allclose(torch.ones(len(batch["image"])))


def test_fast_dev_run_leaves_no_run_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(["fit", *tiny_fit_args(tmp_path), "--trainer.fast_dev_run", "true"])
    assert not run_dir(tmp_path).exists()
    assert not (tmp_path / "checkpoints").exists(), "nothing may be written into the working directory"


def test_register_count_is_one_flag_away(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["fit", *tiny_fit_args(tmp_path), "--model.num_registers", "16", "--print_config"])
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["model"]["init_args"]["num_registers"] == 16


def test_several_configs_and_dotted_overrides(tmp_path, capsys):
    extra = tmp_path / "extra.yaml"
    extra.write_text("model:\n  init_args:\n    lr: 0.5\ntrainer:\n  max_steps: 7\n")
    with pytest.raises(SystemExit):
        main(
            [
                "fit",
                *tiny_fit_args(tmp_path),
                "--config",
                str(extra),
                "--model.init_args.pool",
                "mean",
                "--print_config",
            ]
        )
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["model"]["init_args"]["lr"] == 0.5
    assert config["model"]["init_args"]["pool"] == "mean"
    assert config["trainer"]["max_steps"] == 7


def test_resume_from_last_checkpoint(own_run):
    run, into_copy = own_run
    main(["fit", "--config", str(run / "config.yaml"), *into_copy, "--trainer.max_steps", "6", "--ckpt_path", "last"])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["global_step"] == 6


# --- bad input: one line, exit code 2, nothing half-written -------------------------------


def wide_checkpoint(tmp_path: Path) -> Path:
    model = timm.create_model(TINY_MODEL, num_classes=0, **{**TINY, "embed_dim": 48, "patch_size": 8})
    path = tmp_path / "wide.safetensors"
    save_file(model.state_dict(), path)
    return path


def corrupt_checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "corrupt.ckpt"
    path.write_bytes(b"garbage" * 100)
    return path


def unknown_key_config(tmp_path: Path) -> Path:
    path = tmp_path / "typo.yaml"
    path.write_text("model:\n  init_args:\n    num_register: 4\n")
    return path


BAD_INPUTS = {
    "negative registers": (
        lambda p: ["--model.num_registers", "-1"],
        "--model.init_args.num_registers: -1 is not a NonNegativeInt (v>=0)",
    ),
    "non-integer registers": (
        lambda p: ["--model.num_registers", "2.5"],
        "num_registers\": Not of type NonNegativeInt: invalid literal for int() with base 10: '2.5'",
    ),
    "unknown model": (lambda p: ["--model.model_name", "vit_tiny_patch16_2244"], "did you mean vit_tiny_patch16_224"),
    "not a ViT": (lambda p: ["--model.model_name", "resnet18"], "resnet18 is not a Vision Transformer"),
    "img_size vs patch": (lambda p: ["--data.init_args.img_size", "36"], "not divisible by its patch size"),
    "missing checkpoint": (lambda p: ["--model.checkpoint", str(p / "nope.pt")], "checkpoint not found"),
    "wrong shapes": (lambda p: ["--model.checkpoint", str(wide_checkpoint(p))], "but the model expects"),
    "corrupt checkpoint": (lambda p: ["--model.checkpoint", str(corrupt_checkpoint(p))], "cannot read checkpoint"),
    "missing data folder": (
        lambda p: ["--data", "regablate.data.HFDataModule", "--data.path", str(p / "no_such_folder")],
        "data folder not found",
    ),
    "unknown config key": (lambda p: ["--config", str(unknown_key_config(p))], "'num_register' is not accepted"),
    "missing ckpt_path": (lambda p: ["--ckpt_path", str(p / "gone.ckpt")], "ckpt_path not found"),
    "missing config file": (lambda p: ["--config", str(p / "absent.yaml")], "File does not exist"),
    "classes mismatch": (lambda p: ["--model.num_classes", "7"], "the data has 4 classes but model.num_classes is 7"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gives_one_line_and_no_run_folder(tmp_path, capsys, case):
    make_args, message = BAD_INPUTS[case]
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *tiny_fit_args(tmp_path), *make_args(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("regablate: error: ") and message in err[-1], err
    assert "Traceback" not in "\n".join(err)
    assert not run_dir(tmp_path).exists(), "a failed start must not leave a run folder"


@pytest.mark.slow
def test_console_entry_exits_non_zero_without_traceback(tmp_path):
    result = run_regablate("fit", *tiny_fit_args(tmp_path), "--model.num_registers", "-3", timeout=120, check=False)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "regablate: error: --model.init_args.num_registers: -3 is not a NonNegativeInt (v>=0)"
    )
