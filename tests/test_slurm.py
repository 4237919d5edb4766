"""The Slurm launcher on a real one-node Slurm (the session fixture ``slurm``; the tests skip and say why
where slurm-wlm and munge cannot run), and the sweep's ``--status``.

* a 2-task job is one DDP world (gloo, one CPU per task) with the loss of a 2-process local DDP run;
* a job signalled as at its time limit saves, is requeued, and resumes to the uninterrupted result;
* a grid of 3 runs runs as one job array, 2 at a time, and ``--status`` follows it;
* a job the cluster cannot run is refused in one line before anything is submitted.

Every sweep is a real ``python -m regablate sweep`` process; its jobs run the stages as processes
of their own. Signalled runs load ``tests.signals`` by class path, so the repository goes on
``PYTHONPATH`` (sbatch passes the environment on to the job).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from regablate.errors import RegablateError
from regablate.sweep.command import sweep as run_sweep
from regablate.sweep.grid import load_grid
from regablate.sweep.slurm import parse_squeue
from regablate.sweep.status import RunStatus, eta_seconds, format_status, run_status
from tests.conftest import REPO, run_regablate

TINY = REPO / "tests" / "configs" / "tiny.yaml"
DDP = {"trainer.accelerator": "cpu", "trainer.strategy": "ddp", "data.init_args.batch_size": 8}
RESULTS = ("train/loss", "val/loss", "val/top1", "global_step")
SLURM = {"timeout_min": 10, "cpus_per_task": 1}


def write_grid(folder: Path, name: str, overrides: dict, launcher: dict, registers: list[int] = (2,)) -> Path:
    """A one-stage grid (fit) of the tiny config."""
    spec = {
        "name": name,
        "base": str(TINY),
        "overrides": overrides,
        "axes": {"model.init_args.num_registers": list(registers)},
        "stages": [{"command": "fit"}],
        "launcher": launcher,
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"grid": spec}))
    return path


def sweep(output: Path, grid: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run_regablate("sweep", str(grid), "--output", str(output), "--report", "false", *args, check=check)


class Sweep:
    """A ``regablate sweep`` process in the background, its output going to ``log``."""

    def __init__(self, output: Path, grid: Path, log: Path, *args: str) -> None:
        command = [sys.executable, "-m", "regablate", "sweep", str(grid), "--output", str(output), "--report", "false"]
        self.log = log
        with log.open("w") as handle:
            self.process = subprocess.Popen(
                [*command, *args],
                cwd=REPO,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
                stdout=handle,
                stderr=subprocess.STDOUT,
            )

    def output(self) -> str:
        return self.log.read_text()

    def wait_for(self, done: Callable[[], bool], what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            assert self.process.poll() is None, f"the sweep ended before {what}:\n{self.output()[-3000:]}"
            assert time.monotonic() < deadline, f"no {what} within {timeout:.0f} s:\n{self.output()[-3000:]}"
            time.sleep(0.2)

    def finish(self, timeout: float) -> str:
        """Wait for the sweep to end; its whole output."""
        self.process.wait(timeout=timeout)
        return self.output()

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def signal_job(jobs: Path, signal_name: str) -> str:
    """``scancel --signal`` to every task of the run's job (what ``sbatch --signal`` does near the limit)."""
    job = json.loads(jobs.read_text())["r2"]["job_id"]
    subprocess.run(["scancel", f"--signal={signal_name}", job], check=True, timeout=30)
    return job


def cancel_jobs(jobs: Path) -> None:
    """Leave the shared cluster free: cancel whatever this test submitted (a held job would wait minutes)."""
    if jobs.is_file():
        ids = [entry["job_id"] for entry in json.loads(jobs.read_text()).values()]
        subprocess.run(["scancel", *ids], timeout=30, check=False)


@pytest.fixture
def repo_on_path(monkeypatch):
    """Jobs import ``tests.signals``: the repository goes on PYTHONPATH, which sbatch hands to the job."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))


@pytest.mark.slow
def test_two_task_job_is_one_ddp_world_with_the_loss_of_local_ddp(slurm, tmp_path):
    grid = write_grid(tmp_path, "ddp", {**DDP, "trainer.max_steps": 3}, {"devices_per_run": 2, "slurm": SLURM})
    result = sweep(tmp_path / "slurm", grid, "--launcher", "slurm")
    assert re.search(r"r2: slurm job \d+", result.stdout)
    sweep(tmp_path / "local", grid)  # the same grid as 2 local processes (Lightning's own DDP launcher)
    on_slurm, local = summary(tmp_path / "slurm" / "ddp" / "r2"), summary(tmp_path / "local" / "ddp" / "r2")
    assert on_slurm["stages/fit"] == "complete" and on_slurm["global_step"] == 3
    for key in RESULTS:
        assert on_slurm[key] == local[key], key  # same global batches, gradients averaged over 2 ranks
    run = tmp_path / "slurm" / "ddp" / "r2"
    config = yaml.safe_load((run / "sweep_config.yaml").read_text())["trainer"]
    assert (config["devices"], config["num_nodes"]) == (2, 1)
    # The world is the job's two Slurm tasks, one rank each, not two Lightning processes in one task.
    assert "MEMBER: 1/2" in (run / "sweep.log").read_text() and "MEMBER: 2/2" not in (run / "sweep.log").read_text()
    assert "MEMBER: 2/2" in (run / "sweep.rank1.log").read_text()
    script = next((tmp_path / "slurm" / "ddp" / "slurm").glob("*_submission.sh")).read_text()
    for flag in ("--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--signal=USR1@90", "--requeue"):
        assert flag in script, flag


@pytest.mark.slow
def test_job_signalled_at_its_time_limit_is_requeued_and_resumes_to_the_same_result(slurm, tmp_path, repo_on_path):
    """Two DDP tasks held at step 2 of 8 (mid-epoch) are sent what ``--signal=USR1@60`` sends near the limit.

    The sweep that submitted the job dies first; the sweep run again waits for that job instead of
    submitting the run twice.
    """
    overrides = {**DDP, "trainer.max_steps": 8, "trainer.val_check_interval": 4}
    launcher = {
        "devices_per_run": 2,
        "max_requeues": 2,
        "slurm": {**SLURM, "timeout_min": 5, "slurm_signal_delay_s": 60},
    }
    marker = tmp_path / "held_at_step_2"
    wait = {"class_path": "tests.signals.WaitForSignal", "init_args": {"step": 2, "marker": str(marker)}}
    held = write_grid(tmp_path, "held", {**overrides, "trainer.callbacks": [wait]}, launcher)
    jobs = tmp_path / "slurm" / "held" / "slurm" / "jobs.json"
    first = Sweep(tmp_path / "slurm", held, tmp_path / "first.log", "--launcher", "slurm")
    second = None
    try:
        first.wait_for(marker.exists, "the fit held at step 2", timeout=240)
        first.kill()  # the login session dies; the job goes on
        job = json.loads(jobs.read_text())["r2"]["job_id"]
        second = Sweep(tmp_path / "slurm", held, tmp_path / "second.log", "--launcher", "slurm")
        attached = f"r2: slurm job {job} (from an earlier sweep, still RUNNING)"
        second.wait_for(lambda: attached in second.output(), "the second sweep waiting for the job", timeout=120)
        signal_job(jobs, "USR1")
        output = second.finish(timeout=400)
    finally:
        for sweep_ in (first, second):
            if sweep_ is not None:
                sweep_.kill()
        cancel_jobs(jobs)
    assert second.process.returncode == 0, output[-3000:]
    assert json.loads(jobs.read_text())["r2"]["job_id"] == job and len(list(jobs.parent.glob("*_submitted.pkl"))) == 1
    assert "r2: requeued at its time limit (1x so far)" in output and "[1/1] r2: complete" in output
    reference = write_grid(tmp_path, "reference", overrides, {"devices_per_run": 2})
    sweep(tmp_path / "local", reference)  # uninterrupted, 2 local DDP processes
    run = tmp_path / "slurm" / "held" / "r2"
    resumed, uninterrupted = summary(run), summary(tmp_path / "local" / "reference" / "r2")
    assert resumed["stages/fit"] == "complete" and resumed["stages/fit/requeues"] == 1
    assert resumed["stages/fit/requeued_seconds"] > 0
    for key in RESULTS:
        assert resumed[key] == uninterrupted[key], key
    log = (run / "sweep.log").read_text()
    assert "saved" in log and "last.ckpt at step 2" in log and "stage fit saved and requeued" in log
    starts = [line for line in log.splitlines() if "stage fit: " in line]
    assert len(starts) == 2 and "--ckpt_path last" not in starts[0] and "--ckpt_path last" in starts[1]
    assert not list(tmp_path.rglob("hpc_ckpt_*.ckpt"))  # Lightning's own in-handler save stayed off
    script = next((tmp_path / "slurm" / "held" / "slurm").glob("*_submission.sh")).read_text()
    assert "--signal=USR1@60" in script and "--time=5" in script


@pytest.mark.slow
def test_a_job_out_of_requeues_saves_and_fails_with_the_reason(slurm, tmp_path, repo_on_path):
    """``max_requeues: 0``: the signalled job saves ``last.ckpt`` and the run fails, saying why; a rerun resumes."""
    marker = tmp_path / "held_at_step_2"
    wait = {"class_path": "tests.signals.WaitForSignal", "init_args": {"step": 2, "marker": str(marker)}}
    overrides = {"trainer.max_steps": 8, "trainer.val_check_interval": 4, "trainer.callbacks": [wait]}
    grid = write_grid(tmp_path, "limit", overrides, {"max_requeues": 0, "slurm": SLURM})
    sweeper = Sweep(tmp_path / "runs", grid, tmp_path / "sweep.log", "--launcher", "slurm")
    try:
        sweeper.wait_for(marker.exists, "the fit held at step 2", timeout=240)
        signal_job(tmp_path / "runs" / "limit" / "slurm" / "jobs.json", "USR1")
        output = sweeper.finish(timeout=300)
    finally:
        sweeper.kill()
        cancel_jobs(tmp_path / "runs" / "limit" / "slurm" / "jobs.json")
    assert sweeper.process.returncode == 2 and "1 of 1 runs failed: r2" in output
    run = tmp_path / "runs" / "limit" / "r2"
    failed = summary(run)
    assert failed["stages/fit"] == "failed" and failed["stages/fit/exit_code"] == 3
    assert failed["stages/fit/error"].startswith("time limit reached") and "stages/fit/requeues" not in failed
    assert "(launcher.max_requeues)" in failed["stages/fit/error"]
    status = run_regablate("sweep", str(grid), "--output", str(tmp_path / "runs"), "--status", "true").stdout
    assert re.search(r"r2\s+failed\s+fit\s+\S+\s+-\s+exit 3; time limit reached", status), status
    sweep(tmp_path / "runs", grid)  # the same grid again, here locally: it goes on from the saved step
    resumed = summary(run)
    assert resumed["stages/fit"] == "complete" and resumed["global_step"] == 8
    last_start = (run / "sweep.log").read_text().split("stage fit: ")[-1].splitlines()[0]
    assert "--ckpt_path last" in last_start


@pytest.mark.slow
def test_a_job_killed_without_results_fails_its_run(slurm, tmp_path, repo_on_path):
    """A job that dies mid-fit (here SIGKILL, as on a node failure) leaves the queue without results."""
    marker = tmp_path / "held_at_step_2"
    wait = {"class_path": "tests.signals.WaitForSignal", "init_args": {"step": 2, "marker": str(marker)}}
    grid = write_grid(tmp_path, "killed", {"trainer.callbacks": [wait]}, {"slurm": SLURM})
    sweeper = Sweep(tmp_path / "runs", grid, tmp_path / "sweep.log", "--launcher", "slurm")
    try:
        sweeper.wait_for(marker.exists, "the fit held at step 2", timeout=240)
        job = signal_job(tmp_path / "runs" / "killed" / "slurm" / "jobs.json", "KILL")
        output = sweeper.finish(timeout=120)
    finally:
        sweeper.kill()
        cancel_jobs(tmp_path / "runs" / "killed" / "slurm" / "jobs.json")
    assert sweeper.process.returncode == 2 and "[1/1] r2: FAILED" in output
    failed = summary(tmp_path / "runs" / "killed" / "r2")
    assert failed["stages/fit"] == "failed" and "stages/fit/exit_code" not in failed  # no process was seen to end
    reason = f"slurm job {job} ended without finishing (time limit, scancel or node failure)"
    assert failed["stages/fit/error"] == reason


@pytest.mark.slow
def test_grid_of_three_runs_two_at_a_time_with_status(slurm, tmp_path):
    grid = write_grid(tmp_path, "three", {"trainer.max_steps": 6}, {"max_parallel": 2, "slurm": SLURM}, [0, 1, 2])
    output = tmp_path / "runs"
    sweeper = Sweep(output, grid, tmp_path / "sweep.log", "--launcher", "slurm")
    seen = []
    try:
        while sweeper.process.poll() is None:
            status = run_regablate("sweep", str(grid), "--output", str(output), "--status", "true", check=False)
            seen.append(status.stdout)
            time.sleep(1)
        stdout = sweeper.output()
    finally:
        sweeper.kill()
        cancel_jobs(output / "three" / "slurm" / "jobs.json")
    assert sweeper.process.returncode == 0, stdout[-3000:]
    jobs = re.findall(r"(r\d): slurm job (\d+)_(\d)", stdout)
    assert sorted(run for run, _, _ in jobs) == ["r0", "r1", "r2"] and len({array for _, array, _ in jobs}) == 1
    script = next((output / "three" / "slurm").glob("*_submission.sh")).read_text()
    assert "--array=0-2%2" in script
    runs = {name: summary(output / "three" / name) for name in ("r0", "r1", "r2")}
    assert all(s["stages/fit"] == "complete" for s in runs.values())
    spans = [(s["stages/fit/started"], s["stages/fit/ended"]) for s in runs.values()]
    at_once = max(sum(start <= t < end for start, end in spans) for t, _ in spans)
    assert at_once == 2  # two jobs ran side by side, and the array's limit kept the third waiting
    assert any("running" in out and "queued" in out and "PENDING" in out for out in seen), seen[-1:]
    final = run_regablate("sweep", str(grid), "--output", str(output), "--status", "true").stdout
    assert "3 runs: 3 finished" in final and final.count(" finished ") >= 3 and "ETA" not in final


@pytest.mark.slow
@pytest.mark.parametrize(
    "launcher, message",
    [
        ({"slurm": {**SLURM, "slurm_partition": "nope"}}, "partition nope does not exist here; partitions: debug"),
        ({"devices_per_run": 64, "slurm": SLURM}, "1 node(s) x 64 task(s)"),
        ({"nodes_per_run": 3, "slurm": SLURM}, "3 node(s) x 1 task(s)"),
    ],
)
def test_a_job_the_cluster_cannot_run_is_refused_before_submission(slurm, tmp_path, launcher, message):
    grid = write_grid(tmp_path, "bad", {}, launcher)
    with pytest.raises(RegablateError, match=re.escape(message)):
        run_sweep(str(grid), output=str(tmp_path / "runs"), launcher="slurm")
    assert not (tmp_path / "runs").exists()  # nothing written, nothing submitted


@pytest.mark.slow
def test_refusal_is_one_line_and_exit_2(slurm, tmp_path):
    grid = write_grid(tmp_path, "bad", DDP, {"devices_per_run": 64, "slurm": SLURM})  # 64 CPU tasks on 2 CPUs
    result = sweep(tmp_path / "runs", grid, "--launcher", "slurm", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("regablate: error: Slurm refuses each run's job")
    assert "Requested node configuration is not available" in lines[0]
    assert not (tmp_path / "runs").exists()


def test_nodes_per_run_needs_the_slurm_launcher(tmp_path):
    grid = write_grid(tmp_path, "local", {}, {})
    with pytest.raises(RegablateError, match="nodes_per_run 2 needs --launcher slurm"):
        run_sweep(str(grid), output=str(tmp_path / "runs"), nodes_per_run=2)
    assert not (tmp_path / "runs").exists()


def test_squeue_lines_are_read_per_array_element():
    text = "7_1|PENDING|JobArrayTaskLimit\n7_0|RUNNING|None\n9|PENDING|BeginTime\n\n"
    assert parse_squeue(text) == {
        "7_1": "PENDING (JobArrayTaskLimit)",
        "7_0": "RUNNING",
        "9": "PENDING (BeginTime)",
    }


STAGES = ["fit", "probe"]
NOW = 10_000.0


def done(seconds: float, **extra) -> dict:
    return {"stages/fit": "complete", "stages/fit/seconds": seconds, "stages/probe": "complete",
            "stages/probe/seconds": 0.0, **extra}  # fmt: skip


def test_status_of_each_kind_of_run():
    queue = {"5_0": "RUNNING", "5_1": "PENDING (BeginTime)"}
    running = {"stages/fit": "running", "stages/fit/started": NOW - 600, "slurm/job_id": "5_0"}
    requeued = {"stages/fit": "requeued", "stages/fit/requeues": 1, "stages/fit/requeued_seconds": 3600.0}
    failed = {"stages/fit": "complete", "stages/fit/seconds": 10.0, "stages/probe": "failed",
              "stages/probe/exit_code": 1, "stages/probe/log_tail": "...\nRuntimeError: out of memory"}  # fmt: skip
    gone = {"stages/fit": "running", "stages/fit/started": NOW - 60, "slurm/job_id": "5_2"}
    local_dead = {"stages/fit": "running", "stages/fit/started": NOW - 60, "stages/fit/host": socket.gethostname(),
                  "stages/fit/pid": 2**22 + 12345, "slurm/job_id": None}  # fmt: skip
    local_alive = {**local_dead, "stages/fit/pid": os.getpid()}
    cases = {
        "finished": (done(7200.0, **{"stages/fit/requeued_seconds": 3600.0}), "5_3"),
        "running": (running, "5_0"),
        "queued": (requeued, "5_1"),
        "failed": (failed, "5_4"),
        "interrupted": (gone, "5_2"),
        "interrupted-local": (local_dead, None),
        "running-local": (local_alive, None),
        "not started": ({}, None),
    }
    got = {name: run_status(name, s, STAGES, job, queue, {"5_2": "TIMEOUT"}, NOW) for name, (s, job) in cases.items()}
    assert {name: status.state for name, status in got.items()} == {
        "finished": "finished",
        "running": "running",
        "queued": "queued",
        "failed": "failed",
        "interrupted": "interrupted",
        "interrupted-local": "interrupted",
        "running-local": "running",
        "not started": "not started",
    }
    assert got["finished"].elapsed == 10800.0  # requeued attempts count
    assert got["running"].elapsed == 600.0 and got["running"].job_state == "RUNNING"
    assert got["queued"].stage == "fit" and "requeued 1x" in got["queued"].note
    assert got["failed"].stage == "probe" and got["failed"].note == "exit 1; RuntimeError: out of memory"
    assert got["interrupted"].job_state == "TIMEOUT" and "run the sweep again" in got["interrupted"].note
    assert "its sweep has ended" in got["interrupted-local"].note


def test_eta_from_the_finished_runs():
    statuses = [
        RunStatus("a", "finished", elapsed=100.0),
        RunStatus("b", "finished", elapsed=300.0),
        RunStatus("c", "running", elapsed=50.0),
        RunStatus("d", "queued"),
        RunStatus("e", "not started"),
    ]
    # mean 200 s a run: 150 s left for c, 200 s each for d and e, two at a time.
    assert eta_seconds(statuses, parallel=2) == (275.0, 200.0)
    assert eta_seconds(statuses[:2], parallel=2) is None  # nothing left
    assert eta_seconds(statuses[2:], parallel=2) is None  # nothing finished yet
    grid = load_grid(REPO / "tests" / "configs" / "grid_micro.yaml")
    text = format_status(grid, Path("runs/micro"), statuses, parallel=2)
    assert text.splitlines()[0] == "sweep micro (runs/micro/): 5 runs: 2 finished, 1 running, 1 queued, 1 not started"
    assert text.splitlines()[-1] == "ETA 4 min 35 s (mean 3 min 20 s per run over 2 finished, 2 at once)"


def test_status_of_a_local_sweep_from_its_run_folders(tmp_path, capsys):
    from regablate.cli import main
    from regablate.runs import write_json_atomic

    grid = write_grid(tmp_path, "local", {}, {}, [0, 1])
    write_json_atomic(tmp_path / "runs" / "local" / "r0" / "summary.json", done(30.0))
    main(["sweep", str(grid), "--output", str(tmp_path / "runs"), "--status", "true"])
    out = capsys.readouterr().out
    assert "2 runs: 1 finished, 1 not started" in out
    assert re.search(r"r0\s+finished\s+-\s+-\s+30 s", out) and re.search(r"r1\s+not started", out)
