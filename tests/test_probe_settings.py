"""The probe's settings: one typed group per protocol; a setting of the other protocol is refused, naming its own."""

from __future__ import annotations

import pytest

from regablate.cli import main
from regablate.cli import parse_command as parse
from regablate.errors import RegablateError
from regablate.probe.dinov2 import DINOv2Settings
from regablate.probe.settings import FastSettings, LinearProbe

MODEL = ["--model", "vit_tiny_patch16_224", "--pretrained", "false", "--patch_size", "4", "--img_size", "32"]


def refusal(capsys, *flags: str) -> list[str]:
    with pytest.raises(SystemExit) as exit_:
        main(["probe", *MODEL, *flags])
    assert exit_.value.code == 2
    return capsys.readouterr().err.splitlines()


def test_a_fast_setting_under_the_dinov2_protocol_is_refused_naming_the_dinov2_setting(capsys):
    err = refusal(capsys, "--probe.protocol", "dinov2", "--probe.fast.cls_steps", "20")
    assert err == [
        "regablate: error: --probe.fast.cls_steps is a setting of --probe.protocol fast and does nothing under "
        "--probe.protocol dinov2; use --probe.dinov2.cls_iterations (the dinov2 protocol's settings are "
        "--probe.dinov2.*)"
    ]


def test_the_old_spelling_of_a_fast_setting_is_rewritten_then_refused_under_dinov2(capsys):
    """The issue's command line: ``--probe.cls_steps`` (regablate 0.2) with the dinov2 protocol, in either order."""
    for flags in (
        ("--probe.protocol", "dinov2", "--probe.cls_steps", "20"),
        ("--probe.cls_steps", "20", "--probe.protocol", "dinov2"),
    ):
        notice, error = refusal(capsys, *flags)
        assert notice.startswith("regablate probe: --probe.cls_steps is deprecated, use --probe.fast.cls_steps")
        assert error.startswith("regablate: error: --probe.fast.cls_steps is a setting of --probe.protocol fast")
        assert "use --probe.dinov2.cls_iterations" in error


def test_a_dinov2_setting_under_the_fast_protocol_is_refused_naming_the_fast_setting(capsys):
    (error,) = refusal(capsys, "--probe.dinov2.seg_batch_size", "4")
    assert error.startswith("regablate: error: --probe.dinov2.seg_batch_size is a setting of --probe.protocol dinov2")
    assert "under --probe.protocol fast; use --probe.fast.batch_size" in error
    (error,) = refusal(capsys, "--probe.dinov2.depth_flip_test", "false")  # no fast equivalent: the group is named
    assert error.endswith("does nothing under --probe.protocol fast (the fast protocol's settings are --probe.fast.*)")


def test_each_protocol_takes_its_own_settings():
    fast = parse(["probe", *MODEL, "--probe.fast.cls_steps", "20", "--probe.fast.lrs", "[0.1]"])
    probe = LinearProbe.parsed(fast.probe.as_dict())
    assert probe.fast_settings == FastSettings(cls_steps=20, lrs=[0.1]) and probe.dinov2 is None
    flags = ["--probe.protocol", "dinov2", "--probe.dinov2.cls_iterations", "20", "--probe.probes", "[cls]"]
    probe = LinearProbe.parsed(parse(["probe", *MODEL, *flags]).probe.as_dict())
    dinov2 = probe.dinov2_settings
    assert dinov2.cls_iterations == 20 and dinov2.cls_batch_size == DINOv2Settings().cls_batch_size
    assert probe.fast is None
    assert list(probe.probes) == ["cls"]
    # The shared settings and the defaults of each group.
    assert LinearProbe().fast_settings == FastSettings() and LinearProbe(protocol="dinov2").dinov2 == DINOv2Settings()
    with pytest.raises(RegablateError, match="the fast protocol has no dinov2 settings"):
        _ = LinearProbe().dinov2_settings


def test_the_python_api_refuses_the_other_protocols_group_too():
    with pytest.raises(RegablateError, match=r"^--probe.fast.seg_steps is a setting of --probe.protocol fast .*"):
        LinearProbe(protocol="dinov2", fast=FastSettings(seg_steps=3))
    with pytest.raises(RegablateError, match=r"^--probe.dinov2.\* is a setting of --probe.protocol dinov2"):
        LinearProbe(dinov2=DINOv2Settings())  # given, though every value is the default


def run_folder_with(tmp_path, data: str):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(f"seed_everything: 0\ndata:\n{data}")
    return run


def test_a_run_folders_data_are_the_defaults_of_one_parse(tmp_path):
    """The run's data (a class with flags the default data lack) apply where given; later --data flags change them."""
    run = run_folder_with(
        tmp_path, "  class_path: regablate.data.HFDataModule\n  init_args: {path: data/x, img_size: 32}\n"
    )
    cfg = parse(["probe", str(run), "--data.init_args.test_split", "validation", "--data.img_size", "16"])
    assert cfg.data.class_path == "regablate.data.HFDataModule"
    assert (cfg.data.init_args.path, cfg.data.init_args.test_split, cfg.data.init_args.img_size) == (
        "data/x",
        "validation",
        16,
    )
    checkpoint = parse(["probe", "--checkpoint", str(run)])  # a run folder given as --checkpoint: the same
    assert checkpoint.data.init_args.path == "data/x"
    assert parse(["probe", *MODEL]).data.class_path == "regablate.data.SyntheticScenes"  # no run: the default


def test_a_data_flag_before_the_run_folder_is_refused_not_replaced(tmp_path, capsys):
    run = run_folder_with(tmp_path, "  class_path: regablate.data.SyntheticScenes\n  init_args: {test_size: 7}\n")
    with pytest.raises(SystemExit):
        main(["probe", "--data.test_size", "5", str(run)])
    (error,) = capsys.readouterr().err.splitlines()
    assert error.startswith("regablate: error:") and "give the run folder before any --data flag" in error
