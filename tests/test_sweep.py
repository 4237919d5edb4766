"""`regablate sweep` and `regablate report` on micro grids of the tiny fit (tests/configs/grid_micro.yaml).

Every sweep is a real `python -m regablate sweep` subprocess, as a user runs it; its stages are
processes of their own.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from regablate.cli import main as regablate_main
from regablate.errors import RegablateError
from regablate.report.settings import Report
from regablate.report.tables import aggregate, results_markdown
from regablate.sweep.grid import Launcher, load_grid, merge
from regablate.sweep.resolve import resolve_config
from tests.conftest import REPO, run_regablate, subprocess_env

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


FIT = "  axes: {seed_everything: [0]}\n  stages: [{command: fit}]\n"


@pytest.mark.parametrize(
    "body, message",
    [
        (
            "  axes: {seed_everything: []}\n  stages: [{command: fit}]\n",
            "grid.axes.seed_everything needs a non-empty list",
        ),
        (
            "  axes: {seed_everything: [0]}\n  stages: [{command: train}]\n",
            'grid.stages (regablate.sweep.grid.Stage): Parser key "command": Expected a typing.Literal[',
        ),
        (FIT + "  launch: {}\n", "grid.launch is not a key of a grid file"),
        (FIT + "  launch: {max_parallel: 2}\n", "Group 'grid' does not accept option 'launch.max_parallel'"),
        (FIT + "  launcher: {max_paralel: 2}\n", "Group 'grid' does not accept option 'launcher.max_paralel'"),
        (FIT + "  launcher: {max_parallel: 0}\n", "grid.launcher.max_parallel: 0 is not a PositiveInt (v>0)"),
        (
            FIT + "  launcher: {nodes_per_run: two}\n",
            'Parser key "grid.launcher.nodes_per_run": Not of type PositiveInt',
        ),
        (FIT + "  report: {paper: maybe}\n", "Parser key \"grid.report.paper\": Expected a <class 'bool'>"),
        (FIT + "  report: {num_images: 0}\n", "grid.report.num_images: 0 is not a PositiveInt (v>0)"),
        (FIT + "  overrides: [trainer.max_steps]\n", "Parser key \"grid.overrides\": Expected a <class 'dict'>"),
        (
            "  axes: {seed_everything: [0]}\n  stages: [{command: fit, argz: {--x: 1}}]\n",
            "grid.stages (regablate.sweep.grid.Stage): Option 'argz.--x' is not accepted",
        ),
        (
            "  axes: {seed_everything: [0]}\n  stages: [{command: fit, args: {trainer.max_steps: 1}}]\n",
            "stage fit: args map flags (--name) to values; 'trainer.max_steps' is none",
        ),
        (
            "  axes: {seed_everything: [0, 0]}\n  stages: [{command: fit}]\n",
            "grid.axes.seed_everything repeats a value",
        ),
    ],
)
def test_bad_grid_files_get_one_clear_error_naming_the_key(tmp_path, body, message):
    with pytest.raises(RegablateError) as err:
        load_grid(micro_grid(tmp_path, "bad", body))
    assert message in str(err.value) and str(err.value).startswith(str(tmp_path / "bad.yaml"))
    assert "\n" not in str(err.value)


def test_free_form_grid_values_are_kept_as_written(tmp_path):
    """Overrides, axes, stage args and Slurm settings reach the runs as written: no class is built, no text retyped."""
    callback = {
        "class_path": "lightning.pytorch.callbacks.LearningRateMonitor",
        "init_args": {"logging_interval": "step"},
    }
    grid = load_grid(
        micro_grid(
            tmp_path,
            "free",
            f"""  overrides: {{trainer.callbacks: [{json.dumps(callback)}], trainer.logger.init_args.version: "7"}}
  axes: {{data.init_args.seed: ["1", 2], case: {{a: {{trainer.callbacks: [{json.dumps(callback)}]}}}}}}
  stages: [{{command: fit}}, {{command: probe, args: {{--dataset: "0.10", --data: {json.dumps(callback)}}}}}]
  launcher: {{slurm: {{slurm_time: "01:00:00"}}}}
""",
        )
    )
    assert grid.overrides == {"trainer.callbacks": [callback], "trainer.logger.init_args.version": "7"}
    assert grid.axes["data.init_args.seed"] == ["1", 2] and grid.axes["case"]["a"] == {"trainer.callbacks": [callback]}
    assert grid.stages[1].args == {"--dataset": "0.10", "--data": callback}
    assert grid.stages[1].argv == ("--dataset", "0.10", "--data", json.dumps(callback))
    assert grid.launcher.slurm == {"slurm_time": "01:00:00"}


def test_a_grid_of_0_2_gets_one_line_saying_what_to_write(tmp_path):
    path = micro_grid(
        tmp_path,
        "old",
        "  axes: {seed_everything: [0]}\n  stages:\n    - {command: fit}\n"
        '    - {command: probe, args: [--probe.fast.cls_steps, "10", --probe.probes, "[cls, seg]", --cache=false]}\n',
    )
    with pytest.raises(RegablateError) as err:
        load_grid(path)
    assert str(err.value) == (
        f"{path}: grid.stages[1].args is a list of command-line words (regablate 0.2); since 0.3 it maps each flag "
        "to its value: args: {--probe.fast.cls_steps: 10, --probe.probes: [cls, seg], --cache: false}"
    )
    # What the line says to write loads, and gives the stage the same command line.
    old = '[--probe.fast.cls_steps, "10", --probe.probes, "[cls, seg]", --cache=false]'
    new = "{--probe.fast.cls_steps: 10, --probe.probes: [cls, seg], --cache: false}"
    path.write_text(path.read_text().replace(old, new))
    assert load_grid(path).stages[1].argv == (
        "--probe.fast.cls_steps",
        "10",
        "--probe.probes",
        '["cls", "seg"]',
        "--cache",
        "false",
    )


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
def test_the_gpu_checks_rehearsal_part_sweeps_on_a_device_and_compares_with_the_cpu_sweep(swept, tmp_path):
    """benchmarks/gpu_rehearsal.py on the CPU: the micro grid on the "device", the swept grid as reference."""
    reference, _ = swept
    command = [sys.executable, str(REPO / "benchmarks" / "gpu_rehearsal.py"), "--output", str(tmp_path)]
    command += ["--grid", str(MICRO), "--reference", str(reference), "--prepare", "false"]
    command += ["--accelerator", "cpu", "--precision", "32-true", "--only", "num_registers=0"]
    result = subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "gpu_check: rehearsal device sweep (device.log): exit 0" in out
    assert "gpu_check: rehearsal r0_s0: stages fit complete, probe complete: ok" in out
    assert re.search(r"r0_s0 train/loss step \d+: cpu [\d.]+, device [\d.]+ \(ok, rtol 0.05\)", out), out
    assert re.search(r"r0_s0 val/loss: cpu [\d.]+, device [\d.]+ \(ok", out), out
    assert "gpu_check: rehearsal device report: written" in out and "FAIL" not in out and "r2_s0" not in out
    grid = yaml.safe_load((tmp_path / "device_grid.yaml").read_text())["grid"]
    assert grid["overrides"] == {"trainer.accelerator": "cpu", "trainer.precision": "32-true"}


@pytest.mark.slow
def test_second_invocation_does_no_work(swept):
    experiment, _ = swept
    checkpoints = {p: p.stat().st_mtime_ns for p in experiment.glob("*/checkpoints/*.ckpt")}
    before = summaries(experiment)
    result = sweep(experiment.parent.parent, MICRO, "--report", "false")
    assert "2 already complete, 0 to run" in result.stdout
    assert {p: p.stat().st_mtime_ns for p in experiment.glob("*/checkpoints/*.ckpt")} == checkpoints
    assert summaries(experiment) == before


def start_micro_sweep(tmp_path: Path, *args: str, **popen: object) -> tuple[subprocess.Popen, Path, Path]:
    """The micro grid's r0_s0 swept in the background, returned held in its second epoch, after its first checkpoint.

    Returns the sweep, the run folder and the grid file (the micro grid with a callback that holds the fit).
    """
    grid = tmp_path / "held.yaml"
    hold = {"class_path": "tests.signals.HoldAtStep", "init_args": {"step": 5, "marker": str(tmp_path / "held")}}
    grid.write_text(
        yaml.safe_dump({"grid": {"name": "micro", "extends": str(MICRO), "overrides": {"trainer.callbacks": [hold]}}})
    )
    command = [sys.executable, "-m", "regablate", "sweep", str(grid), "--output", str(tmp_path / "runs")]
    command += ["--only", "num_registers=0", "--report", "false", *args]
    sweeper = subprocess.Popen(
        command,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=subprocess_env(),
        **popen,  # type: ignore[call-overload]
    )
    run = tmp_path / "runs" / "micro" / "r0_s0"
    deadline = time.monotonic() + 300
    while not (tmp_path / "held").is_file():
        assert sweeper.poll() is None and time.monotonic() < deadline, "the sweep ended before its second epoch"
        time.sleep(0.05)
    assert (run / "checkpoints" / "last.ckpt").is_file()
    return sweeper, run, grid


def assert_resumes_to(reference: dict, tmp_path: Path, run: Path, grid: Path) -> None:
    """The killed run is left running, and the same sweep again finishes it with ``reference``'s results."""
    interrupted = json.loads((run / "summary.json").read_text())
    assert interrupted["stages/fit"] == "running" and "status" not in interrupted
    result = sweep(tmp_path, grid, "--only", "num_registers=0", "--report", "false")
    assert "0 already complete, 1 to run" in result.stdout
    assert "--ckpt_path last" in (run / "sweep.log").read_text()
    resumed = json.loads((run / "summary.json").read_text())
    assert resumed["stages/fit"] == resumed["stages/probe"] == "complete" and resumed["global_step"] == 8
    for key in RESULT_KEYS:
        assert resumed[key] == pytest.approx(reference[key], rel=1e-5, abs=1e-6), key


def session_processes(session: int) -> list[int]:
    """The live (not zombie) processes of a session: /proc/<pid>/stat's state and session fields."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _ppid, _group, sid = stat.read_text().rsplit(")", 1)[1].split()[:4]
        except (OSError, ValueError):
            continue  # ended meanwhile
        if int(sid) == session and state != "Z":
            pids.append(int(stat.parent.name))
    return pids


@pytest.mark.slow
@pytest.mark.parametrize(("preload", "killed"), [("true", "children"), ("false", "children"), ("true", "sweep")])
def test_killed_sweep_resumes_to_the_same_results(swept, tmp_path, preload, killed):
    """SIGKILL the sweep's children and the sweep, or the sweep alone, after the first epoch's checkpoint;
    nothing of it is left running within two seconds; run it again.

    With the preloaded parent the sweep's children are the fork server (and multiprocessing's
    resource tracker): the stage, forked from the server, dies with it, and the server with the sweep.
    """
    sweeper, run, grid = start_micro_sweep(tmp_path, "--preload", preload, start_new_session=True)
    if killed == "children":
        for pid in Path(f"/proc/{sweeper.pid}/task/{sweeper.pid}/children").read_text().split():
            os.kill(int(pid), signal.SIGKILL)
    sweeper.kill()
    sweeper.wait()
    deadline = time.monotonic() + 2
    while session_processes(sweeper.pid):
        assert time.monotonic() < deadline, f"left running: {session_processes(sweeper.pid)}"
        time.sleep(0.05)
    assert_resumes_to(summaries(swept[0])["r0_s0"], tmp_path, run, grid)


# A sweep that starts a fork server the way ``Preloaded`` does (its pid in the environment), then waits.
GUARDED_SERVER = """
import os, subprocess, sys, time
from regablate.sweep.forkserver_guard import SWEEP_PID_VARIABLE
guarded = "import regablate.sweep.forkserver_guard, time; print(flush=True); time.sleep(60)"
env = {**os.environ, SWEEP_PID_VARIABLE: str(os.getpid())}
server = subprocess.Popen([sys.executable, "-c", guarded], env=env, stdout=subprocess.PIPE)
server.stdout.readline()
print(server.pid, flush=True)
time.sleep(60)
"""


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_the_fork_server_dies_with_the_sweep_that_started_it():
    """The guard the fork server imports first: SIGKILL when its sweep dies, or at once if the sweep is gone."""
    sweep_process = subprocess.Popen(
        [sys.executable, "-c", GUARDED_SERVER], stdout=subprocess.PIPE, text=True, env=subprocess_env(), cwd=REPO
    )
    assert sweep_process.stdout is not None
    server = int(sweep_process.stdout.readline())
    assert alive(server)
    sweep_process.kill()
    sweep_process.wait()
    deadline = time.monotonic() + 2
    while alive(server):
        assert time.monotonic() < deadline, "the fork server outlived its sweep"
        time.sleep(0.05)
    late = "from regablate.sweep.deathsig import die_with_parent; die_with_parent(-1); print('alive')"
    orphan = subprocess.run(
        [sys.executable, "-c", late], capture_output=True, text=True, env=subprocess_env(), cwd=REPO, check=False
    )
    assert orphan.returncode == -signal.SIGKILL and "alive" not in orphan.stdout


@pytest.mark.slow
def test_a_killed_process_group_leaves_nothing_running_and_resumes_to_the_same_results(swept, tmp_path):
    """``kill -9`` of the sweep's process group mid-fit: no process of it is left, and the rerun finishes alike."""
    sweeper, run, grid = start_micro_sweep(tmp_path, start_new_session=True)
    assert len(session_processes(sweeper.pid)) >= 3  # the sweep, the fork server, the stage
    os.killpg(sweeper.pid, signal.SIGKILL)
    sweeper.wait()
    deadline = time.monotonic() + 10
    while session_processes(sweeper.pid):
        assert time.monotonic() < deadline, f"left running: {session_processes(sweeper.pid)}"
        time.sleep(0.05)
    assert_resumes_to(summaries(swept[0])["r0_s0"], tmp_path, run, grid)


@pytest.mark.slow
def test_stages_forked_from_the_preloaded_parent_give_what_new_processes_give(swept, tmp_path):
    """The same run swept with a new ``python -m regablate`` per stage has the same results: own seeds, own state."""
    result = sweep(tmp_path, MICRO, "--only", "num_registers=0", "--report", "false", "--preload", "false")
    assert "all 1 runs complete" in result.stdout
    fresh = summaries(tmp_path / "runs" / "micro")["r0_s0"]
    forked = summaries(swept[0])["r0_s0"]
    for key in RESULT_KEYS:
        assert fresh[key] == pytest.approx(forked[key], rel=1e-5, abs=1e-6), key


@pytest.mark.slow
def test_a_stage_killed_by_a_signal_is_recorded_with_it_and_the_others_complete(tmp_path):
    grid = micro_grid(
        tmp_path,
        "crash",
        """  axes:
    model.init_args.num_registers: [2]
    case:
      good: {}
      segfault: {trainer.callbacks: [{class_path: tests.signals.Segfault}]}
  stages: [{command: fit}]
""",
    )
    result = sweep(tmp_path, grid, "--report", "false", check=False)
    assert result.returncode == 2 and "1 of 2 runs failed: r2_segfault" in result.stderr
    runs = summaries(tmp_path / "runs" / "crash")
    assert runs["r2_good"]["stages/fit"] == "complete" and runs["r2_good"]["status"] == "complete"
    crashed = runs["r2_segfault"]
    assert crashed["stages/fit"] == "failed" and crashed["stages/fit/exit_code"] == -signal.SIGSEGV
    assert crashed["stages/fit/error"] == "killed by SIGSEGV"
    assert "stage fit exited -11 after" in (tmp_path / "runs" / "crash" / "r2_segfault" / "sweep.log").read_text()


@pytest.mark.slow
def test_a_failing_run_is_recorded_and_the_others_complete(tmp_path):
    """A run that fails in its own process (here: its checkpoint file is missing) fails alone."""
    missing = tmp_path / "missing.safetensors"
    grid = micro_grid(
        tmp_path,
        "failing",
        f"""  axes:
    model.init_args.num_registers: [2]
    case:
      good: {{}}
      bad: {{model.init_args.checkpoint: {missing}}}
  stages: [{{command: fit}}]
""",
    )
    result = sweep(tmp_path, grid, check=False)
    assert result.returncode == 2
    assert "regablate: error: 1 of 2 runs failed: r2_bad" in result.stderr
    runs = summaries(tmp_path / "runs" / "failing")
    assert runs["r2_good"]["stages/fit"] == "complete" and runs["r2_good"]["status"] == "complete"
    assert runs["r2_bad"]["stages/fit"] == "failed" and runs["r2_bad"]["stages/fit/exit_code"] == 2
    assert "missing.safetensors" in runs["r2_bad"]["stages/fit/log_tail"]
    assert "r2_bad" in (tmp_path / "runs" / "failing" / "results.md").read_text()  # the report covers the partial grid


@pytest.mark.parametrize("dry_run", [True, False])
@pytest.mark.parametrize(
    "axis, message",
    [
        (
            "model.init_args.num_registers: [-1, 2]",
            "run r-1: --model.init_args.num_registers: -1 is not a NonNegativeInt (v>=0); nothing was started",
        ),
        (
            "model.init_args.num_regsters: [1, 2]",
            "run num_regsters-1: model (regablate.tasks.Classification): Option 'num_regsters' is not accepted "
            "(and 1 more run(s) of the 2); nothing was started",
        ),
    ],
)
def test_a_run_whose_config_does_not_parse_is_refused_before_anything_starts(tmp_path, capsys, axis, message, dry_run):
    grid = micro_grid(tmp_path, "invalid", f"  axes:\n    {axis}\n  stages: [{{command: fit}}]\n")
    args = ["sweep", str(grid), "--output", str(tmp_path / "runs"), "--dry_run", str(dry_run).lower()]
    with pytest.raises(SystemExit) as exit_:
        regablate_main(args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err == f"regablate: error: {message}: fix the grid and sweep again\n"
    assert not (tmp_path / "runs").exists()  # no run folder, no config written


@pytest.mark.parametrize(
    "stage, problem",
    [
        (
            "{command: probe, args: {--probe.cls_stepz: 5}}",
            "stage probe: its arguments do not parse: unrecognized arguments: --probe.cls_stepz",
        ),
        (
            "{command: probe, args: {--probe.protocol: slow}}",
            'stage probe: its arguments do not parse: Parser key "probe.protocol"',
        ),
        (
            "{command: probe, args: {--probe.protocol: dinov2, --probe.fast.cls_steps: 5}}",
            "stage probe: its arguments do not parse: --probe.fast.cls_steps is a setting of --probe.protocol fast "
            "and does nothing under --probe.protocol dinov2; use --probe.dinov2.cls_iterations",
        ),
        ("{name: maps, command: inspect, args: {--num_images: many}}", "stage maps: its arguments do not parse:"),
    ],
)
def test_a_tool_stage_whose_flags_do_not_parse_is_refused_before_the_fit(tmp_path, capsys, stage, problem):
    grid = micro_grid(tmp_path, "flags", f"  axes: {{seed_everything: [0]}}\n  stages: [{{command: fit}}, {stage}]\n")
    with pytest.raises(SystemExit):
        regablate_main(["sweep", str(grid), "--output", str(tmp_path / "runs"), "--preflight", "false"])
    err = capsys.readouterr().err
    assert err.startswith(f"regablate: error: run s0: {problem}") and len(err.splitlines()) == 1
    assert err.endswith("; nothing was started: fix the grid and sweep again\n")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--max_requeues", "2"],
            "--max_requeues 2 needs --launcher slurm: a local sweep runs each run on this machine",
        ),
        (["--nodes_per_run", "1"], "--nodes_per_run 1 needs --launcher slurm"),
    ],
)
def test_a_launcher_flag_without_effect_is_refused(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_:
        regablate_main(["sweep", str(tmp_path / "no_such_grid.yaml"), *flags])  # refused before the grid is read
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "its settings: --max_parallel, --devices_per_run" in err and len(err.splitlines()) == 1


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
      args: {--probe.fast.cls_steps: 12500, --probe.probes: [cls], --data.init_args.path: x}
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
    probe: {{--probe.fast.cls_steps: 5, --data.init_args.path: "{{grid_dir}}/data", --probe.fast.batch_size: 8}}
  launcher: {{max_parallel: 1, slurm: {{timeout_min: 5}}}}
"""
    )
    grid, base = load_grid(child), load_grid(parent)
    assert grid.name == "rehearsal" and grid.base == base.base
    assert [(s.name, s.command) for s in grid.stages] == [(s.name, s.command) for s in base.stages]
    assert grid.stages[1].args == {
        "--probe.fast.cls_steps": 5,
        "--probe.probes": ["cls"],
        "--data.init_args.path": f"{child.parent.resolve()}/data",
        "--probe.fast.batch_size": 8,
    }
    assert grid.stages[1].argv == (
        *(
            "--probe.fast.cls_steps",
            "5",
            "--probe.probes",
            '["cls"]',
            "--data.init_args.path",
            f"{child.parent.resolve()}/data",
        ),
        *("--probe.fast.batch_size", "8"),
    )
    assert grid.overrides == {"trainer.max_steps": 4, "trainer.val_check_interval": 50}
    assert grid.axes == {"model.init_args.num_registers": [0, 1, 2], "seed_everything": [0]}
    assert [run.name for run in grid.runs] == ["r0_s0", "r1_s0", "r2_s0"]
    assert grid.launcher == Launcher(max_parallel=1, slurm={"timeout_min": 5, "mem_gb": 480})
    assert grid.report == Report(paper=True)


def test_the_extends_rule_merges_mappings_key_by_key_and_replaces_everything_else(tmp_path):
    assert merge({"a": {"x": 1, "y": [1, 2]}, "b": 1}, {"a": {"y": [3], "z": None}, "c": 2}) == {
        "a": {"x": 1, "y": [3], "z": None},
        "b": 1,
        "c": 2,
    }
    assert merge({"a": {"x": 1}}, {"a": [1]}) == {"a": [1]} and merge([1], {"a": 1}) == {"a": 1}
    micro_grid(
        tmp_path,
        "parent",
        """  overrides: {model.init_args.model_kwargs: {depth: 2, embed_dim: 32}, trainer.max_steps: 8}
  axes:
    method:
      plain: {model.init_args.lr: 0.001}
      fast: {model.init_args.lr: 0.01}
    model.init_args.num_registers: [0, 2]
  stages: [{command: fit}, {command: probe, args: {--probe.probes: [cls, seg], --probe.fast.cls_steps: 10}}]
  series: {more: {axes: {model.init_args.num_registers: [4]}, stages: [fit]}}
""",
    )
    child = tmp_path / "child.yaml"
    child.write_text(
        """grid:
  extends: parent.yaml
  name: child
  overrides: {model.init_args.model_kwargs: {depth: 4}, trainer.max_steps: null}
  axes:
    method: {fast: {model.init_args.lr: 0.1}, slow: {model.init_args.lr: 0.0001}}
    model.init_args.num_registers: [1]
  stage_args: {probe: {--probe.probes: [cls]}}
  series: {more: {axes: {model.init_args.num_registers: [8]}}}
"""
    )
    grid = load_grid(child)
    # Mappings merge key by key, recursively: a bundle changes or joins, a nested override keeps its other keys.
    assert grid.overrides == {"model.init_args.model_kwargs": {"depth": 4, "embed_dim": 32}, "trainer.max_steps": None}
    assert grid.axes["method"] == {
        "plain": {"model.init_args.lr": 0.001},
        "fast": {"model.init_args.lr": 0.1},
        "slow": {"model.init_args.lr": 0.0001},
    }
    # Lists (and null) replace.
    assert grid.axes["model.init_args.num_registers"] == [1]
    assert grid.stages[1].args == {"--probe.probes": ["cls"], "--probe.fast.cls_steps": 10}
    assert grid.series["more"].axes == {"model.init_args.num_registers": [8]} and grid.series["more"].stages == ["fit"]
    assert [run.name for run in grid.runs] == [
        "plain_r1",
        "fast_r1",
        "slow_r1",
        "plain_r8_more",
        "fast_r8_more",
        "slow_r8_more",
    ]


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


def test_a_stage_that_succeeds_on_retry_keeps_no_trace_of_the_failure(tmp_path):
    from regablate.runs import RunRecord
    from regablate.sweep.state import mark_finished

    def read_summary(run_dir):
        return RunRecord(run_dir).read()

    (tmp_path / "sweep.log").write_text("regablate: error: data: Option 'test_split' is not accepted\n")
    mark_finished(tmp_path, "probe", 2, 1.0, reason="bad flag")
    failed = read_summary(tmp_path)
    assert failed["stages/probe"] == "failed" and failed["stages/probe/exit_code"] == 2
    assert "test_split" in failed["stages/probe/log_tail"] and failed["stages/probe/error"] == "bad flag"
    mark_finished(tmp_path, "probe", 0, 2.0)
    assert read_summary(tmp_path) == {
        "stages/probe": "complete",
        "stages/probe/seconds": 2.0,
        "stages/probe/ended": read_summary(tmp_path)["stages/probe/ended"],
    }


@pytest.mark.slow
def test_interventions_grid_rehearsed_on_the_swept_runs(swept, tmp_path):
    """configs/fig8/interventions.yaml's stages on the micro grid's trained runs (copied; the stages of
    tests/configs/grid_micro_interventions.yaml): K = 0..R and four interventions, each probe in its own
    folder, then the report's interventions figure. Classification only."""
    shutil.copytree(swept[0], tmp_path / "runs" / "micro")
    grid = tmp_path / "interventions.yaml"
    rehearsal = {"extends": str(MICRO.parent / "grid_micro_interventions.yaml"), "name": "micro"}
    grid.write_text(yaml.safe_dump({"grid": {**rehearsal, "stage_args": {"probe": {"--probe.probes": ["cls"]}}}}))
    result = sweep(tmp_path, grid)
    assert "0 already complete, 2 to run" in result.stdout and "all 2 runs complete" in result.stdout
    experiment = tmp_path / "runs" / "micro"
    found = summaries(experiment)
    kinds = ("zero", "mean", "noise", "shuffle")
    assert sorted(found) == sorted(
        ["r0_s0", "r0_s0_k0", "r2_s0", *(f"r2_s0_k{k}" for k in range(3))] + [f"r2_s0_{kind}" for kind in kinds]
    )
    assert found["r2_s0"]["stages/probe_k_k2"] == found["r2_s0"]["stages/probe_tampered_shuffle"] == "complete"
    assert found["r2_s0"]["probe/seg_miou"] == summaries(swept[0])["r2_s0"]["probe/seg_miou"]  # not probed again
    for kind in kinds:
        assert found[f"r2_s0_{kind}"]["register_intervention"] == kind and "probe/cls_top1" in found[f"r2_s0_{kind}"]
    assert found["r2_s0_k1"]["test_registers"] == 1 and found["r2_s0_k1"]["num_registers"] == 2
    assert (experiment / "interventions.png").stat().st_size > 10_000


def test_a_grid_over_the_gpu_memory_budget_is_refused_before_anything_runs(tmp_path, capsys):
    axes = "  axes:\n    data.init_args.batch_size: [2, 200000]\n  stages: [{command: fit}]\n"
    grid = micro_grid(tmp_path, "memory", axes)
    args = ["sweep", str(grid), "--output", str(tmp_path / "runs"), "--gpu_memory_gb", "4"]
    with pytest.raises(SystemExit) as exit_:
        regablate_main(args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    assert re.fullmatch(
        r"regablate: error: run (\S*200000\S*): estimated peak GPU memory ([\d.]+) GiB per device exceeds "
        r"--gpu_memory_gb 4 \(.*\)\n",
        err,
    ), err
    assert float(re.search(r"memory ([\d.]+) GiB", err).group(1)) > 4
    assert not (tmp_path / "runs").exists()
    regablate_main([*args[:-1], "1000", "--dry_run", "true"])
    assert re.search(
        r"memory: every run's estimated peak fits 1000 GiB per device \(largest: \S*200000", capsys.readouterr().out
    )
