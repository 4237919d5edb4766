"""`regablate sweep` and `regablate report` on micro grids of the tiny fit (tests/configs/grid_micro.yaml).

Every sweep is a real `python -m regablate sweep` subprocess, as a user runs it; its stages are
processes of their own.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from regablate.errors import RegablateError
from regablate.report.tables import aggregate, results_markdown
from regablate.sweep.grid import load_grid
from regablate.sweep.resolve import resolve_config
from tests.conftest import REPO, run_regablate

MICRO = REPO / "tests" / "configs" / "grid_micro.yaml"
TINY = REPO / "tests" / "configs" / "tiny.yaml"
RESULT_KEYS = ("val/top1", "val/loss", "probe/cls_top1", "probe/seg_miou", "probe/depth_rmse", "probe/lost_corloc")


def sweep(cwd: Path, grid: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run_regablate("sweep", str(grid), "--output", str(cwd / "runs"), *args, cwd=cwd, check=check)


def micro_grid(tmp_path: Path, name: str, body: str) -> Path:
    """A grid file on the tiny config (``body`` is the YAML under ``grid:`` after name and base)."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"grid:\n  name: {name}\n  base: {TINY}\n{body}")
    return path


def summaries(experiment: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(experiment.glob("*/summary.json"))}


@pytest.fixture(scope="module")
def swept(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The micro grid swept once, uninterrupted: the reference the other tests compare with."""
    cwd = tmp_path_factory.mktemp("sweep")
    return cwd / "runs" / "micro", sweep(cwd, MICRO)


def test_grid_expands_as_specified(tmp_path):
    grid = load_grid(MICRO)
    assert [run.name for run in grid.runs] == ["r0_s0", "r2_s0"]
    assert grid.runs[1].overrides == {
        "trainer.max_steps": 8,
        "trainer.val_check_interval": 4,
        "model.init_args.num_registers": 2,
        "seed_everything": 0,
    }
    assert [stage.command for stage in grid.stages] == ["fit", "probe"]
    # Any dotted key is an axis; a named axis sets a bundle of keys; the last axis varies fastest.
    path = micro_grid(
        tmp_path,
        "axes",
        """  axes:
    method:
      distill: {model.class_path: regablate.tasks.Distillation, model.init_args.num_views: 2}
      dino: {model.class_path: regablate.tasks.DINO}
    model.init_args.lr: [0.001, 0.01]
    model.init_args.num_registers: [0, 4]
  stages: [{command: fit}]
""",
    )
    runs = load_grid(path).runs
    assert len(runs) == 8
    assert runs[0].name == "distill_lr-0.001_r0"
    assert runs[0].overrides == {
        "model.class_path": "regablate.tasks.Distillation",
        "model.init_args.num_views": 2,
        "model.init_args.lr": 0.001,
        "model.init_args.num_registers": 0,
    }
    # Every axis is a key the tasks accept: each point's config resolves.
    grid = load_grid(path)
    for run in (runs[0], runs[-1]):
        assert yaml.safe_load(resolve_config(grid.base, run.overrides))["model"]["init_args"]["lr"] in (0.001, 0.01)
    assert [r.name for r in runs if r.matches({"num_registers": "4", "method": "dino"})] == [
        "dino_lr-0.001_r4",
        "dino_lr-0.01_r4",
    ]


@pytest.mark.parametrize(
    "body, message",
    [
        ("  axes: {seed_everything: []}\n  stages: [{command: fit}]\n", "non-empty list"),
        ("  axes: {seed_everything: [0]}\n  stages: [{command: train}]\n", "unknown stage command 'train'"),
        ("  axes: {seed_everything: [0]}\n  stages: [{command: fit}]\n  launch: {}\n", "unknown key(s) launch"),
    ],
)
def test_bad_grid_files_get_one_clear_error(tmp_path, body, message):
    with pytest.raises(RegablateError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_grid(micro_grid(tmp_path, "bad", body))


@pytest.mark.slow
def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path):
    result = sweep(tmp_path, MICRO, "--dry_run", "true", "--only", "num_registers=2")
    assert "1 runs" in result.stdout and "r2_s0: new, fit -> probe" in result.stdout
    assert "regablate fit --config" in result.stdout and "r0_s0" not in result.stdout
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_complete_sweep_writes_every_artifact(swept):
    experiment, result = swept
    assert "[2/2] r2_s0: complete" in result.stdout and "all 2 runs complete" in result.stdout
    for name, summary in summaries(experiment).items():
        run = experiment / name
        assert summary["status"] == "complete" and summary["stages/fit"] == summary["stages/probe"] == "complete"
        assert summary["stages/fit/seconds"] > 0 and summary["global_step"] == 8
        assert all(key in summary for key in RESULT_KEYS)
        config = yaml.safe_load((run / "sweep_config.yaml").read_text())
        assert config["trainer"]["logger"]["init_args"]["version"] == name
        assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "config.yaml").is_file()
        assert "stage probe exited 0" in (run / "sweep.log").read_text()
    rows = (experiment / "results.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[0].startswith("run,num_registers,seed,status")
    table = (experiment / "results.md").read_text()
    assert "| trained registers | 0 | 1 |" in table and "| trained registers | 2 | 1 |" in table and "**" in table
    assert (experiment / "figure8.png").stat().st_size > 10_000
    events = EventAccumulator(str(experiment / "hparams" / "r2_s0"))
    events.Reload()
    assert "_hparams_/session_start_info" in events.summary_metadata
    assert "probe/cls_top1" in events.Tags()["scalars"]


@pytest.mark.slow
def test_second_invocation_does_no_work(swept):
    experiment, _ = swept
    checkpoints = {p: p.stat().st_mtime_ns for p in experiment.glob("*/checkpoints/*.ckpt")}
    before = summaries(experiment)
    result = sweep(experiment.parent.parent, MICRO, "--report", "false")
    assert "2 already complete, 0 to run" in result.stdout
    assert {p: p.stat().st_mtime_ns for p in experiment.glob("*/checkpoints/*.ckpt")} == checkpoints
    assert summaries(experiment) == before


@pytest.mark.slow
def test_killed_sweep_resumes_to_the_same_results(swept, tmp_path):
    """SIGKILL the stage process and the sweep after the first epoch's checkpoint; run it again."""
    reference = summaries(swept[0])["r0_s0"]
    command = [
        sys.executable,
        "-m",
        "regablate",
        "sweep",
        str(MICRO),
        "--output",
        str(tmp_path / "runs"),
        "--only",
        "num_registers=0",
        "--report",
        "false",
    ]
    sweeper = subprocess.Popen(
        command,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    run = tmp_path / "runs" / "micro" / "r0_s0"
    deadline = time.monotonic() + 300
    while not (run / "checkpoints" / "last.ckpt").is_file():
        assert sweeper.poll() is None and time.monotonic() < deadline, "the sweep ended before its first checkpoint"
        time.sleep(0.05)
    children = Path(f"/proc/{sweeper.pid}/task/{sweeper.pid}/children").read_text().split()
    for pid in children:
        os.kill(int(pid), signal.SIGKILL)
    sweeper.kill()
    sweeper.wait()
    interrupted = json.loads((run / "summary.json").read_text())
    assert interrupted["stages/fit"] == "running" and "status" not in interrupted
    result = sweep(tmp_path, MICRO, "--only", "num_registers=0", "--report", "false")
    assert "0 already complete, 1 to run" in result.stdout
    assert "--ckpt_path last" in (run / "sweep.log").read_text()
    resumed = json.loads((run / "summary.json").read_text())
    assert resumed["stages/fit"] == resumed["stages/probe"] == "complete" and resumed["global_step"] == 8
    for key in RESULT_KEYS:
        assert resumed[key] == pytest.approx(reference[key], rel=1e-5, abs=1e-6), key


@pytest.mark.slow
def test_a_failing_run_is_recorded_and_the_others_complete(tmp_path):
    grid = micro_grid(
        tmp_path,
        "failing",
        """  axes:
    model.init_args.num_registers: [-1, 2]
  stages: [{command: fit}]
""",
    )
    result = sweep(tmp_path, grid, check=False)
    assert result.returncode == 2
    assert "regablate: error: 1 of 2 runs failed: r-1" in result.stderr
    runs = summaries(tmp_path / "runs" / "failing")
    assert runs["r2"]["stages/fit"] == "complete" and runs["r2"]["status"] == "complete"
    assert runs["r-1"]["stages/fit"] == "failed" and runs["r-1"]["stages/fit/exit_code"] == 2
    assert "num_registers" in runs["r-1"]["stages/fit/log_tail"]
    assert "r-1" in (tmp_path / "runs" / "failing" / "results.md").read_text()  # the report covers the partial grid


@pytest.mark.slow
def test_ddp_grid_point(tmp_path):
    grid = micro_grid(
        tmp_path,
        "ddp",
        """  overrides: {trainer.accelerator: cpu, trainer.strategy: ddp, data.init_args.batch_size: 8}
  axes:
    model.init_args.num_registers: [2]
  stages: [{command: fit}]
""",
    )
    sweep(tmp_path, grid, "--devices_per_run", "2", "--report", "false")
    run = tmp_path / "runs" / "ddp" / "r2"
    assert yaml.safe_load((run / "sweep_config.yaml").read_text())["trainer"]["devices"] == 2
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stages/fit"] == "complete" and summary["global_step"] == 4
    assert "MEMBER: 2/2" in (run / "sweep.log").read_text()  # rank 1 ran


@pytest.mark.slow
def test_slurm_launcher_runs_the_grid_as_jobs(slurm, tmp_path):
    grid = micro_grid(
        tmp_path,
        "slurm",
        """  axes:
    model.init_args.num_registers: [2]
  stages: [{command: fit}]
  launcher: {slurm: {timeout_min: 10, cpus_per_task: 1}}
""",
    )
    result = sweep(tmp_path, grid, "--launcher", "slurm", "--report", "false")
    assert "slurm job" in result.stdout
    summary = json.loads((tmp_path / "runs" / "slurm" / "r2" / "summary.json").read_text())
    assert summary["stages/fit"] == "complete" and summary["status"] == "complete"
    assert list((tmp_path / "runs" / "slurm" / "slurm").glob("*_submission.sh"))


def test_test_time_register_results_are_a_series_of_their_own():
    rows = [
        {"run": "r0_s0", "num_registers": 0, "seed": 0, "status": "complete", "probe/cls_top1": 0.5},
        {
            "run": "r0_s0_ttr",
            "num_registers": 0,
            "seed": 0,
            "status": "complete",
            "test_time_registers": 1,
            "probe/cls_top1": 0.6,
        },
    ]
    table = aggregate(rows)
    assert table["trained registers"][0]["probe/cls_top1"] == [0.5]
    assert table["+ test-time register"][0]["probe/cls_top1"] == [0.6]
    assert "| + test-time register | 0 | 1 |" in results_markdown("grid", rows)


def test_a_grid_that_extends_another_runs_its_stages_with_its_own_sizes(tmp_path):
    parent = micro_grid(
        tmp_path,
        "parent",
        """  overrides: {trainer.max_steps: 100, trainer.val_check_interval: 50}
  axes:
    model.init_args.num_registers: [0, 1, 2]
    seed_everything: [0, 1]
  stages:
    - {name: fit, command: fit}
    - name: probe
      command: probe
      args: [--probe.cls_steps, "12500", --probe.probes, "[cls]", --data.init_args.path, x]
  launcher: {max_parallel: 4, slurm: {timeout_min: 2880, mem_gb: 480}}
  report: {paper: true}
""",
    )
    child = tmp_path / "sub" / "rehearsal.yaml"
    child.parent.mkdir()
    child.write_text(
        f"""grid:
  extends: {parent}
  name: rehearsal
  overrides: {{trainer.max_steps: 4}}
  axes: {{seed_everything: [0]}}
  stage_args:
    probe: {{--probe.cls_steps: 5, --data.init_args.path: "{{grid_dir}}/data", --probe.batch_size: 8}}
  launcher: {{max_parallel: 1, slurm: {{timeout_min: 5}}}}
"""
    )
    grid, base = load_grid(child), load_grid(parent)
    assert grid.name == "rehearsal" and grid.base == base.base
    assert [(s.name, s.command) for s in grid.stages] == [(s.name, s.command) for s in base.stages]
    assert grid.stages[1].args == (
        *(
            "--probe.cls_steps",
            "5",
            "--probe.probes",
            "[cls]",
            "--data.init_args.path",
            f"{child.parent.resolve()}/data",
        ),
        *("--probe.batch_size", "8"),
    )
    assert grid.overrides == {"trainer.max_steps": 4, "trainer.val_check_interval": 50}
    assert grid.axes == {"model.init_args.num_registers": [0, 1, 2], "seed_everything": [0]}
    assert [run.name for run in grid.runs] == ["r0_s0", "r1_s0", "r2_s0"]
    assert grid.launcher == {"max_parallel": 1, "slurm": {"timeout_min": 5, "mem_gb": 480}}
    assert grid.report == {"paper": True}


@pytest.mark.parametrize(
    "body, message",
    [
        ("  stages: [{command: fit}]\n", "a grid that extends another runs its stages"),
        ("  stage_args: {probe: {--x: 1}}\n", "grid.stage_args names no stage probe; stages: fit"),
        ("  extends: loop.yaml\n", "goes round in a circle"),
    ],
)
def test_bad_extending_grids_get_one_clear_error(tmp_path, body, message):
    micro_grid(tmp_path, "parent", "  axes: {seed_everything: [0]}\n  stages: [{command: fit}]\n")
    (tmp_path / "loop.yaml").write_text("grid:\n  name: loop\n  extends: loop.yaml\n")
    path = tmp_path / "child.yaml"
    extends = "" if "extends" in body else "  extends: parent.yaml\n"
    path.write_text(f"grid:\n  name: child\n{extends}{body}")
    with pytest.raises(RegablateError, match=message):
        load_grid(path)
