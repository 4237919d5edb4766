"""The sweep's plan: which runs have work left, and each one's config, checked before anything starts.

Every run with work left gets its config resolved by the run's own parser (LightningCLI's, parse
only: nothing instantiated, so a constrained value such as a negative register count, or a key
that no class takes, is refused here), and the arguments of its probe and inspect stages are
parsed by that tool's parser, with the run's data as their default (no model built). One run
that does not parse stops the sweep with one line naming the run, the key and the problem, before
any run folder is written: on Slurm that is an error now rather than a job array that fails after
its queue wait.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ArgumentError, ArgumentParser, Namespace

from regablate.commands import Renamed, modernise, parser_message
from regablate.errors import RegablateError
from regablate.sweep.grid import EXPERIMENT, Grid, PlannedRun, Stage
from regablate.sweep.launch import RunJob
from regablate.sweep.slurm import JobShape
from regablate.sweep.state import CONFIG_FILE

TOOL_STAGES = ("probe", "inspect")  # stages whose arguments their tool's parser checks at plan time


@dataclass
class Plan:
    """The grid's runs sorted by what is left: ``jobs`` to run (with their resolved configs) and ``complete`` ones."""

    jobs: list[RunJob] = field(default_factory=list)
    resolved: dict[str, str] = field(default_factory=dict)  # run name -> its resolved config (YAML)
    complete: list[RunJob] = field(default_factory=list)

    @property
    def total(self) -> int:
        return len(self.jobs) + len(self.complete)


def make_plan(
    grid: Grid, runs: list[PlannedRun], experiment: Path, devices_per_run: int | None, shape: JobShape | None = None
) -> Plan:
    """Resolve and check the config of every run with work left; write nothing.

    A Slurm job of several tasks fits one DDP world across them: its runs get ``trainer.devices``
    (tasks per node) and ``trainer.num_nodes`` of the job's shape. A run that does not parse is
    refused (``RegablateError``) naming it, and how many others do not parse either.
    """
    from regablate.sweep.resolve import resolve_config  # LightningCLI's parser: here, not for --help

    plan = Plan()
    invalid: list[str] = []
    for run in runs:
        run_dir = experiment / run.name
        job = RunJob(run, run_dir, run_dir / CONFIG_FILE, grid.stages_of(run))
        if not job.pending_stages():
            plan.complete.append(job)
            continue
        overrides = run_overrides(run, experiment, devices_per_run, shape)
        try:
            plan.resolved[run.name] = config = resolve_config(grid.base_of(run), overrides)
            check_stage_arguments(job.pending_stages(), yaml.load(config, Loader=yaml.CSafeLoader).get("data"))
        except RegablateError as err:
            invalid.append(f"run {run.name}: {err}")
            continue
        plan.jobs.append(job)
    if invalid:
        more = f" (and {len(invalid) - 1} more run(s) of the {len(runs)})" if len(invalid) > 1 else ""
        raise RegablateError(f"{invalid[0]}{more}; nothing was started: fix the grid and sweep again")
    return plan


def run_overrides(
    run: PlannedRun, experiment: Path, devices_per_run: int | None, shape: JobShape | None
) -> dict[str, Any]:
    """The dotted keys a run's config gets over its base configs: its axes', its folder's and its devices'."""
    overrides = {
        **{key: _in_experiment(value, experiment) for key, value in run.overrides.items()},
        "trainer.logger.init_args.save_dir": str(experiment.parent),
        "trainer.logger.init_args.name": experiment.name,
        "trainer.logger.init_args.version": run.name,
    }
    if devices_per_run:
        overrides["trainer.devices"] = devices_per_run
    if shape is not None and shape.tasks > 1:
        overrides["trainer.devices"] = shape.tasks_per_node
        overrides["trainer.num_nodes"] = shape.nodes
    return overrides


def _in_experiment(value: Any, experiment: Path) -> Any:
    return value.replace("{" + EXPERIMENT + "}", str(experiment)) if isinstance(value, str) else value


def check_stage_arguments(stages: list[Stage], run_data: dict[str, Any] | None) -> None:
    """Parse the arguments of each probe and inspect stage as its tool will; a flag it refuses is refused now."""
    for stage in stages:
        if stage.command in TOOL_STAGES:
            stage_arguments(stage, run_data)


def stage_arguments(stage: Stage, run_data: dict[str, Any] | None) -> Namespace:
    """A probe or inspect stage's arguments as its tool parses them (a probe's data default: the run's data)."""
    return _parsed(stage.name, stage.command, stage.argv, json.dumps(run_data, sort_keys=True, default=str))


@lru_cache(maxsize=256)
def _parsed(name: str, command: str, argv: tuple[str, ...], run_data: str) -> Namespace:
    parser = _tool_parser(command)
    if command == "probe":
        parser.set_defaults(data=json.loads(run_data) or {"class_path": "regablate.data.SyntheticScenes"})
    try:
        parsed = parser.parse_args(modernise(list(argv), command, _renamed(command)))
        if command == "probe":
            from regablate.probe.settings import LinearProbe

            LinearProbe.parsed(parsed.probe.as_dict())  # a setting of the other protocol is refused
        return parsed
    except ArgumentError as err:
        raise RegablateError(f"stage {name}: its arguments do not parse: {parser_message(str(err))}") from None
    except RegablateError as err:
        raise RegablateError(f"stage {name}: its arguments do not parse: {err}") from None


def _renamed(command: str) -> tuple[Renamed, ...]:
    """The old spellings of a tool's flags, rewritten (with a notice) as the tool itself does."""
    if command == "probe":
        from regablate.probe.command import RENAMED
    else:
        from regablate.artifacts.inspect import RENAMED
    return RENAMED


@cache
def _tool_parser(command: str) -> ArgumentParser:
    if command == "probe":
        from regablate.probe.command import build_parser
    else:
        from regablate.artifacts.inspect import build_parser
    return build_parser()
