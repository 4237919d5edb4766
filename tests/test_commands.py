"""One command-line style: 0.1 spellings still work with a notice, repeatable flags, one-line parse errors."""

from __future__ import annotations

import pytest

from regablate.cli import main, parser_message
from regablate.commands import Renamed, modernise
from regablate.report.command import build_parser as report_parser
from regablate.sweep.command import RENAMED as SWEEP_RENAMED
from regablate.sweep.command import build_parser as sweep_parser

GRID = "configs/fig8/cpu.yaml"


def test_old_spellings_are_rewritten_with_one_notice_each(capsys):
    argv = ["grid.yaml", "--dry-run", "--max-parallel", "3", "--devices-per-run=2", "--no-report", "--dry-run"]
    new = modernise(argv, "sweep", SWEEP_RENAMED)
    assert new == [
        *["grid.yaml", "--dry_run", "true", "--max_parallel", "3", "--devices_per_run", "2"],
        *["--report", "false", "--dry_run", "true"],
    ]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all("is deprecated, use" in line for line in err)
    assert "--dry-run is deprecated, use --dry_run true" in err[0]


def test_rewritten_spellings_parse_as_the_new_ones():
    old = sweep_parser().parse_args(
        modernise([GRID, "--dry-run", "--max-parallel", "3", "--no-report"], "sweep", SWEEP_RENAMED)
    )
    new = sweep_parser().parse_args([GRID, "--dry_run", "true", "--max_parallel", "3", "--report", "false"])
    assert old == new and old.dry_run is True and old.max_parallel == 3 and old.report is False


def test_a_bare_boolean_of_0_1_takes_true_but_a_value_is_left_alone(capsys):
    renamed = (Renamed("--paper", "--paper", "true"),)
    assert modernise(["runs/x", "--paper"], "report", renamed) == ["runs/x", "--paper", "true"]
    assert "--paper is deprecated" in capsys.readouterr().err
    assert modernise(["runs/x", "--paper", "false"], "report", renamed) == ["runs/x", "--paper", "false"]
    assert capsys.readouterr().err == ""
    assert report_parser().parse_args(["runs/x", "--paper", "true"]).paper is True


def test_a_repeatable_flag_collects_every_use():
    argv = modernise([GRID, "--only", "num_registers=4", "--only=seed_everything=0"], "sweep", repeatable=("--only",))
    assert sweep_parser().parse_args(argv).only == ["num_registers=4", "seed_everything=0"]


@pytest.mark.parametrize(
    "args, expected",
    [
        (["sweep", GRID, "--max_parallel", "0"], "--max_parallel: 0 is not a PositiveInt (v>0)"),
        (["inspect", "--model", "vit_tiny_patch16_224", "--num_images", "0"], "--num_images: 0 is not a PositiveInt"),
        (
            ["fit", "--config", "configs/quickstart.yaml", "--model.init_args.lr", "-1"],
            "--model.init_args.lr: -1 is not a PositiveFloat",
        ),
        (["report", "runs/x", "--num_images", "-2"], "--num_images: -2 is not a PositiveInt (v>0)"),
    ],
)
def test_a_number_out_of_range_is_one_line_at_parse_time(args, expected, capsys, monkeypatch):
    from tests.conftest import REPO

    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"regablate: error: {expected}")


def test_parser_message_passes_other_problems_through():
    assert (
        parser_message("Parser key \"x\":\n  Expected a <class 'int'>.")
        == "Parser key \"x\": Expected a <class 'int'>."
    )


def test_help_shows_the_constraint(capsys):
    with pytest.raises(SystemExit):
        sweep_parser().parse_args(["--help"])
    assert "PositiveInt" in capsys.readouterr().out


def test_a_tool_parser_takes_no_abbreviated_flag():
    parser = report_parser()
    flags = [flag for action in parser._actions for flag in action.option_strings if len(flag) > 6]
    assert flags
    with pytest.raises(Exception, match="unrecognized"):
        parser.parse_args([flags[-1][:-1], "x"])


def test_the_training_parser_takes_no_abbreviated_flag(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", "configs/quickstart.yaml", "--trainer.max_step", "10", "--print_config"])
    assert exit_.value.code == 2
    assert "--trainer.max_step" in capsys.readouterr().err
