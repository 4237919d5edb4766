"""Errors a new user meets first: out-of-range numbers refused at parse time, a --ckpt_path that is no checkpoint.

Each ends in one line, ``regablate: error: ...``, exit code 2, and no run folder.
"""

from pathlib import Path

import pytest
import torch

from regablate.cli import main
from regablate.lightning_cli import build_cli
from tests.conftest import REPO, run_regablate, tiny_fit_args

CONFIGS = REPO / "tests" / "configs"
MONITOR = ["--trainer.callbacks+", "regablate.callbacks.OutlierNormMonitor"]
MAPS = ["--trainer.callbacks+", "regablate.callbacks.AttentionMaps"]
HF = ["--data", "regablate.data.HFDataModule", "--data.path", "some/folder"]

# (config, arguments, the one line it must end in)
OUT_OF_RANGE = {
    "lr": ("tiny", ["--model.init_args.lr", "-1"], "--model.init_args.lr: -1 is not a PositiveFloat (v>0)"),
    "lr, short key": ("tiny", ["--model.lr", "0"], "--model.init_args.lr: 0 is not a PositiveFloat (v>0)"),
    "weight decay": ("tiny", ["--model.weight_decay", "-0.1"], "weight_decay: -0.1 is not a NonNegativeFloat"),
    "warmup": ("tiny", ["--model.warmup_steps", "-5"], "warmup_steps: -5 is not a NonNegativeInt (v>=0)"),
    "min lr ratio": ("tiny", ["--model.min_lr_ratio", "1.5"], "min_lr_ratio: 1.5 is not a ClosedUnitInterval"),
    "label smoothing": ("tiny", ["--model.label_smoothing", "2"], "label_smoothing: 2 is not a ClosedUnitInterval"),
    "classes": ("tiny", ["--model.num_classes", "0"], "num_classes: 0 is not a PositiveInt (v>0)"),
    "temperature": ("tiny_dino", ["--model.student_temp", "0"], "student_temp: 0 is not a PositiveFloat"),
    "teacher temperature": ("tiny_dino", ["--model.teacher_temp", "-1"], "teacher_temp: -1 is not a PositiveFloat"),
    "momentum": ("tiny_dino", ["--model.teacher_momentum", "1.2"], "teacher_momentum: 1.2 is not a ClosedUnitInterval"),
    "centre momentum": ("tiny_dino", ["--model.center_momentum", "-0.5"], "center_momentum: -0.5 is not a Closed"),
    "crop scale": (
        "tiny_dino",
        ["--model.local_crop_scale", "[0, 0.4]"],
        "0 is not a PositiveFraction",
    ),
    "crop scale > 1": ("tiny_dino", ["--model.global_crop_scale", "[0.4, 1.5]"], "1.5 is not a PositiveFraction"),
    "crop range": (
        "tiny_dino",
        ["--model.global_crop_scale", "[0.9, 0.4]"],
        "global_crop_scale is a range (low, high)",
    ),
    "mask ratio": ("tiny_dino", ["--model.mask_ratio_min_max", "[0.1, 1.0]"], "1.0 is not a Fraction (v>=0 and v<1)"),
    "mask ratio < 0": ("tiny_dino", ["--model.mask_ratio_min_max", "[-0.1, 0.5]"], "-0.1 is not a Fraction"),
    "mask range": (
        "tiny_dino",
        ["--model.mask_ratio_min_max", "[0.5, 0.1]"],
        "mask_ratio_min_max is a range (low",
    ),
    "sinkhorn": ("tiny_dino", ["--model.sinkhorn_iterations", "0"], "sinkhorn_iterations: 0 is not a PositiveInt"),
    "koleo": ("tiny_dino", ["--model.koleo_loss_weight", "-0.1"], "koleo_loss_weight: -0.1 is not a NonNegativeFloat"),
    "layer decay": ("tiny_dino", ["--model.layerwise_decay", "0"], "layerwise_decay: 0 is not a PositiveFraction"),
    "layer decay > 1": ("tiny_dino", ["--model.layerwise_decay", "1.1"], "1.1 is not a PositiveFraction (v>0 and"),
    "drop path": ("tiny_dino", ["--model.drop_path_rate", "1"], "drop_path_rate: 1 is not a Fraction"),
    "centring": ("tiny_dino", ["--model.centering", "sinkhorn"], "centering"),
    "local crops": ("tiny_dino", ["--model.num_local_crops", "-1"], "num_local_crops: -1 is not a NonNegativeInt"),
    "prototypes": ("tiny_dino", ["--model.out_dim", "0"], "out_dim: 0 is not a PositiveInt"),
    "views": ("tiny_distill", ["--model.num_views", "0"], "num_views: 0 is not a PositiveInt"),
    "loss weight": ("tiny_distill", ["--model.cls_weight", "-1"], "cls_weight: -1 is not a NonNegativeFloat"),
    "batch size": ("tiny", ["--data.init_args.batch_size", "0"], "--data.init_args.batch_size: 0 is not a PositiveInt"),
    "data size": ("tiny", ["--data.val_size", "0"], "--data.init_args.val_size: 0 is not a PositiveInt"),
    "workers": ("tiny", ["--data.num_workers", "-2"], "num_workers: -2 is not a NonNegativeInt"),
    "hue jitter": ("tiny", ["--data.hue_jitter", "0.9"], "hue_jitter: 0.9 is not a HueJitter (v>=0 and v<=0.5)"),
    "val fraction": ("tiny", [*HF, "--data.val_fraction", "1.5"], "val_fraction: 1.5 is not a OpenUnitInterval"),
    "depth scale": ("tiny", [*HF, "--data.depth_scale", "0"], "depth_scale: 0 is not a PositiveFloat"),
    "monitor images": ("tiny", [*MONITOR, "--trainer.callbacks.num_images", "0"], "num_images: 0 is not a PositiveInt"),
    "monitor cadence": ("tiny", [*MONITOR, "--trainer.callbacks.every_n_steps", "0"], "every_n_steps: 0 is not a"),
    "monitor threshold": ("tiny", [*MONITOR, "--trainer.callbacks.threshold_value", "-4"], "-4 is not a PositiveFloat"),
    "map images": ("tiny", [*MAPS, "--trainer.callbacks.num_images", "-1"], "num_images: -1 is not a PositiveInt"),
}


def fit_args(tmp_path: Path, config: str) -> list[str]:
    return ["--config", str(CONFIGS / f"{config}.yaml"), "--trainer.logger.init_args.save_dir", str(tmp_path / "runs")]


def assert_one_line_error(capsys, exit_info, message: str) -> None:
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("regablate: error: ") and message in err[0], err


@pytest.mark.parametrize("case", list(OUT_OF_RANGE))
def test_out_of_range_numbers_are_refused_at_parse_time(tmp_path, capsys, case):
    config, args, message = OUT_OF_RANGE[case]
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *fit_args(tmp_path, config), *args])
    assert_one_line_error(capsys, exit_info, message)
    assert not (tmp_path / "runs").exists()


def lightning_checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "real.ckpt"
    state = {"state_dict": {"backbone.w": torch.randn(64, 256)}, "epoch": 0, "pytorch-lightning_version": "2.6.6"}
    torch.save(state, path)
    return path


def cut_in_half(path: Path) -> Path:
    data = path.read_bytes()
    cut = path.with_name("cut.ckpt")
    cut.write_bytes(data[: len(data) // 2])
    return cut


def weights_only(tmp_path: Path) -> Path:
    path = tmp_path / "weights.ckpt"
    torch.save({"blocks.0.attn.qkv.weight": torch.zeros(3, 3)}, path)
    return path


BAD_CHECKPOINTS = {
    "text": (lambda p: p / "junk.ckpt", "is not a checkpoint (not a torch.save archive)"),
    "truncated": (lambda p: cut_in_half(lightning_checkpoint(p)), "is not a checkpoint (not a torch.save archive)"),
    "weights": (weights_only, "holds weights, not a Lightning checkpoint (no state_dict) to resume; to start from"),
}


@pytest.mark.parametrize("case", list(BAD_CHECKPOINTS))
def test_a_ckpt_path_that_is_no_checkpoint_fails_in_one_line(tmp_path, capsys, case):
    (tmp_path / "junk.ckpt").write_text("this is not a checkpoint\n" * 20)
    make, message = BAD_CHECKPOINTS[case]
    path = make(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *tiny_fit_args(tmp_path), "--ckpt_path", str(path)])
    assert_one_line_error(capsys, exit_info, f"ckpt_path {path} {message}")
    assert not (tmp_path / "runs").exists()


def test_a_real_lightning_checkpoint_passes_the_check(tmp_path):
    from regablate.lightning_cli import check_lightning_checkpoint

    check_lightning_checkpoint(lightning_checkpoint(tmp_path))  # raises nothing


def test_constrained_values_reach_modules_and_checkpoints_as_plain_numbers(tmp_path):
    cli = build_cli(
        ["--config", str(CONFIGS / "tiny_dino.yaml"), "--model.lr", "0.01", "--data.batch_size", "8"], run=False
    )
    for hparams in (cli.model.hparams, cli.datamodule.hparams):
        for key, value in hparams.items():
            values = value if isinstance(value, (tuple, list)) else [value]
            for item in values:
                assert type(item) in (bool, int, float, str, type(None), dict), (key, type(item))
    assert cli.model.hparams.lr == 0.01 and type(cli.datamodule.hparams.batch_size) is int
    assert type(cli.model.hparams.global_crop_scale[0]) is float


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, message",
    [
        (["--ckpt_path", "junk.ckpt"], "ckpt_path junk.ckpt is not a checkpoint (not a torch.save archive)"),
        (["--model.init_args.lr", "-1"], "--model.init_args.lr: -1 is not a PositiveFloat (v>0)"),
    ],
)
def test_the_issue_commands_end_in_one_line(tmp_path, args, message):
    """``regablate fit --config configs/quickstart.yaml ...`` as the issue ran it: a real process, a fresh folder."""
    (tmp_path / "junk.ckpt").write_text("not a checkpoint")
    result = run_regablate(
        "fit", "--config", str(REPO / "configs" / "quickstart.yaml"), *args, cwd=tmp_path, timeout=120, check=False
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"regablate: error: {message}"), lines
    assert not (tmp_path / "runs").exists()
