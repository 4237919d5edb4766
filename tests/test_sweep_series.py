"""Grids with a further series (``grid.series``) and runs that need other runs (``{experiment}/<run>``).

The CPU grid's continued-pretraining series is built this way: each of its runs starts from the
trained R = 0 run of its seed, so it waits for that run, and fails without starting if that run failed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from regablate.errors import RegablateError
from regablate.report.tables import aggregate
from regablate.runs import RunRecord
from regablate.sweep.command import RunEvents, run_after_needs
from regablate.sweep.grid import load_grid, with_needs
from regablate.sweep.plan import make_plan
from tests.conftest import REPO, run_regablate

TINY = REPO / "tests" / "configs" / "tiny.yaml"
TINY_DISTILL = REPO / "tests" / "configs" / "tiny_distill.yaml"
SERIES = f"""  series:
    continued:
      base: {TINY_DISTILL}
      overrides:
        model.init_args.checkpoint: "{{experiment}}/r0_s{{seed_everything}}/checkpoints/last.ckpt"
      axes:
        model.init_args.num_registers: [2]
      stages: [fit]
"""


def grid_file(tmp_path: Path, body: str, name: str = "series") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        f"grid:\n  name: {name}\n  base: {TINY}\n"
        "  overrides: {trainer.max_steps: 4, trainer.val_check_interval: 2}\n"
        "  axes:\n    model.init_args.num_registers: [0, 2]\n    seed_everything: [0]\n"
        "  stages:\n    - {name: fit, command: fit}\n"
        "    - {name: probe, command: probe, args: {--probe.fast.cls_steps: 5, --probe.probes: [cls],"
        " --cache: false}}\n" + body
    )
    return path


def test_a_series_runs_after_the_run_its_values_name(tmp_path):
    grid = load_grid(grid_file(tmp_path, SERIES))
    runs = {run.name: run for run in grid.runs}
    assert list(runs) == ["r0_s0", "r2_s0", "r2_s0_continued"]
    continued = runs["r2_s0_continued"]
    assert continued.needs == ("r0_s0",) and runs["r0_s0"].needs == ()
    assert continued.axes == {"model.init_args.num_registers": 2, "seed_everything": 0, "series": "continued"}
    assert continued.overrides["model.init_args.checkpoint"] == "{experiment}/r0_s0/checkpoints/last.ckpt"
    assert continued.overrides["trainer.max_steps"] == 4  # the grid's overrides, under the series'
    assert grid.base_of(continued) == [TINY_DISTILL] and grid.base_of(runs["r2_s0"]) == [TINY]
    assert [s.name for s in grid.stages_of(continued)] == ["fit"]
    assert [s.name for s in grid.stages_of(runs["r2_s0"])] == ["fit", "probe"]
    assert [run.name for run in with_needs([continued], grid.runs)] == ["r0_s0", "r2_s0_continued"]

    plan = make_plan(grid, grid.runs, tmp_path / "runs" / "series", None)
    config = yaml.safe_load(plan.resolved["r2_s0_continued"])
    assert config["model"]["class_path"] == "regablate.tasks.Distillation"
    assert config["model"]["init_args"]["checkpoint"] == str(
        tmp_path / "runs" / "series" / "r0_s0/checkpoints/last.ckpt"
    )


def test_runs_are_ordered_after_what_they_need_whatever_the_file_order(tmp_path):
    body = """  series:
    first:
      overrides: {model.init_args.checkpoint: "{experiment}/r2_s0_second/checkpoints/last.ckpt"}
      axes: {model.init_args.num_registers: [2]}
    second:
      axes: {model.init_args.num_registers: [2]}
"""
    names = [run.name for run in load_grid(grid_file(tmp_path, body)).runs]
    assert names.index("r2_s0_second") < names.index("r2_s0_first")


@pytest.mark.parametrize(
    ("series", "message"),
    [
        (
            '    s: {overrides: {model.init_args.checkpoint: "runs/{seed}/last.ckpt"}}\n',
            "names {seed}, which is no axis; known: {experiment}",
        ),
        (
            '    s: {overrides: {model.init_args.checkpoint: "{experiment}/r9_s0/last.ckpt"}}\n',
            "names {experiment}/r9_s0, which is no run of the grid",
        ),
        (
            '    s: {overrides: {model.init_args.checkpoint: "{experiment}/r0_s0_s/last.ckpt"}, '
            "axes: {model.init_args.num_registers: [0]}}\n",
            "r0_s0_s: model.init_args.checkpoint names its own folder",
        ),
        ("    s: {stages: [fit, test]}\n", "grid.series.s.stages names no stage test; stages: fit, probe"),
        ("    s: {stage_args: {}}\n", "grid.series.s.stage_args is not a key of a grid file"),
        (
            "    s: {stage_args: {probe: {--x: 1}}}\n",
            "grid.series (regablate.sweep.grid.Series): Option 'stage_args.probe",
        ),
        ("    - continued\n", "Parser key \"grid.series\": Expected a <class 'dict'>. Got value: ['continued']"),
    ],
)
def test_bad_series_and_references_get_one_clear_error(tmp_path, series, message):
    with pytest.raises(RegablateError, match=None) as err:
        load_grid(grid_file(tmp_path, "  series:\n" + series))
    assert message in str(err.value)


def test_runs_that_need_each_other_in_a_circle_are_refused(tmp_path):
    body = """  series:
    a:
      overrides: {model.init_args.checkpoint: "{experiment}/r2_s0_b/last.ckpt"}
      axes: {model.init_args.num_registers: [2]}
    b:
      overrides: {model.init_args.checkpoint: "{experiment}/r2_s0_a/last.ckpt"}
      axes: {model.init_args.num_registers: [2]}
"""
    with pytest.raises(RegablateError, match="runs need each other in a circle: r2_s0_a, r2_s0_b"):
        load_grid(grid_file(tmp_path, body))


class FakeLauncher:
    """Fails the runs named in ``failing``; records the waves it was given."""

    def __init__(self, failing: set[str]) -> None:
        self.failing, self.waves = failing, []

    def run(self, jobs):
        self.waves.append([job.run.name for job in jobs])
        return {job.run.name: job.run.name not in self.failing for job in jobs}


def test_a_run_whose_needed_run_failed_fails_without_starting(tmp_path, capsys):
    grid = load_grid(grid_file(tmp_path, SERIES))
    experiment = tmp_path / "runs" / "series"
    plan = make_plan(grid, grid.runs, experiment, None)
    launcher = FakeLauncher(failing={"r0_s0"})
    events = RunEvents(total=3, complete=0)
    run_after_needs(launcher, plan, events)
    assert launcher.waves == [["r0_s0", "r2_s0"]]  # the continued run never went to the launcher
    summary = RunRecord(experiment / "r2_s0_continued").read()
    assert summary["stages/fit"] == "failed" and summary.get("status") != "complete"
    assert summary["stages/fit/error"] == "it needs run r0_s0, which failed: fix that run and sweep again"
    assert events.failed == ["r2_s0_continued"] and "[1/3] r2_s0_continued: FAILED" in capsys.readouterr().out

    launcher = FakeLauncher(failing=set())
    run_after_needs(launcher, plan, RunEvents(total=3, complete=0))
    assert launcher.waves == [["r0_s0", "r2_s0"], ["r2_s0_continued"]]


def test_the_report_names_a_series_by_its_name():
    rows = [
        {"run": "r2_s0", "num_registers": 2, "status": "complete", "probe/cls_top1": 0.5},
        {
            "run": "r2_s0_continued",
            "num_registers": 2,
            "status": "complete",
            "probe/cls_top1": 0.7,
            "axis/series": "continued",
        },
    ]
    table = aggregate(rows)
    assert table["trained registers"][2]["probe/cls_top1"] == [0.5]
    assert table["continued"][2]["probe/cls_top1"] == [0.7]


@pytest.mark.slow
def test_a_grid_with_a_continued_series_runs_it_from_the_trained_r0_run(tmp_path):
    grid = grid_file(tmp_path, SERIES)
    done = run_regablate("sweep", str(grid), "--output", str(tmp_path / "runs"), cwd=tmp_path)
    assert "all 3 runs complete" in done.stdout
    experiment = tmp_path / "runs" / "series"
    summary = json.loads((experiment / "r2_s0_continued" / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["task"] == "Distillation" and summary["num_registers"] == 2
    assert "stages/probe" not in summary  # the series runs its own stages
    config = yaml.safe_load((experiment / "r2_s0_continued" / "sweep_config.yaml").read_text())
    source = Path(config["model"]["init_args"]["checkpoint"])
    assert source == experiment / "r0_s0" / "checkpoints" / "last.ckpt" and source.is_file()
    assert "| continued | 2 |" in (experiment / "results.md").read_text()
