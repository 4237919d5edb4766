"""The sweep's preflight: every stage's data checked before the first stage of the first run starts.

A fit (or validate/test/predict) stage reads the run's resolved config; a probe stage reads the
run's data with the stage's ``--data...`` arguments applied by the probe's own parser (parse
only, as the plan parsed them: ``regablate.sweep.plan.stage_arguments``). Each distinct data
config is checked once (``regablate.data.preflight``: metadata only, no image read, no network
needed), and each stage gets one line. A grid whose later stage cannot load its data is refused
before the fit of a day starts.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any, cast

import yaml

from regablate.errors import RegablateError
from regablate.sweep.grid import LIGHTNING_COMMANDS, Grid, Stage
from regablate.sweep.plan import stage_arguments

if TYPE_CHECKING:  # the checks import the data modules (and torch) when a sweep runs them, not for --help
    from regablate.data.preflight import DataCheck

MARKS = {"ok": "ok", "unchecked": "not checked", "error": "ERROR"}


@dataclass(frozen=True)
class StageReport:
    """What the preflight found for one stage over the runs that still have it to do."""

    stage: str
    checks: tuple[DataCheck, ...]  # distinct verdicts, errors first

    @property
    def failed(self) -> bool:
        return any(check.status == "error" for check in self.checks)

    def line(self) -> str:
        if not self.checks:
            return f"  {self.stage}: nothing left to run"
        return f"  {self.stage}: " + "; ".join(f"{MARKS[c.status]}: {c.message}" for c in self.checks)


def stage_data(stage: Stage, run_data: dict[str, Any] | None) -> dict[str, Any] | None:
    """The data config a stage of a run will load (None: a stage whose data the preflight does not know)."""
    if stage.command in LIGHTNING_COMMANDS:
        return run_data
    if stage.command != "probe":
        return None  # inspect: its images come from --images or fixed scenes
    data = stage_arguments(stage, run_data).get("data")
    return data.as_dict() if hasattr(data, "as_dict") else data


def model_problem(stage: Stage, run_data: dict[str, Any] | None, depth: int | None) -> str | None:
    """What a probe stage asks of the run's model (``depth`` blocks; None: unknown) that the model lacks, or None.

    DINOv2's classification heads read the last ``cls_n_last_blocks`` blocks, the token probe its
    ``--token_probe.block``: a model with fewer would fail the probe only after the fit, a day into the run.
    """
    if stage.command != "probe" or depth is None:
        return None
    from regablate.probe.settings import LinearProbe  # the probe's package: here, not for --help

    arguments = stage_arguments(stage, run_data)
    probe, block = LinearProbe.parsed(arguments.probe.as_dict()), arguments.token_probe.block
    if "token" in probe.probes and not -depth <= block < depth:
        return f"--token_probe.block {block} is outside the run's model's {depth} blocks; give {-depth}..{depth - 1}"
    if probe.protocol != "dinov2" or "cls" not in probe.probes:
        return None
    wanted = max(probe.dinov2_settings.cls_n_last_blocks)
    if wanted <= depth:
        return None
    return (
        f"--probe.dinov2.cls_n_last_blocks reads the last {wanted} blocks, "
        f"the run's model has {depth}; give the stage --probe.dinov2.cls_n_last_blocks with values up to {depth}"
    )


def model_depth(init_args: dict[str, Any]) -> int | None:
    """Blocks of a run's backbone: ``model_kwargs.depth``, else its timm model's own (built on the meta device)."""
    depth = (init_args.get("model_kwargs") or {}).get("depth")
    if depth is not None:
        return int(depth)
    name = init_args.get("model_name")
    return _timm_depth(name) if name else None


@cache
def _timm_depth(name: str) -> int | None:
    import timm
    import torch

    try:
        with torch.device("meta"):
            return len(cast("torch.nn.Sequential", timm.create_model(name, pretrained=False, num_classes=0).blocks))
    except (RuntimeError, AttributeError):  # not a timm ViT: the fit stage says so
        return None


def preflight(grid: Grid, resolved: dict[str, str], pending: dict[str, list[Stage]]) -> list[StageReport]:
    """Check the data of every pending stage of every run (``resolved``: run name -> its config YAML)."""
    from regablate.data.preflight import DataCheck

    checked: dict[str, DataCheck] = {}  # each distinct data config, and each (stage, run data), once
    # Each stage of the grid, and each probe a stage's ``over`` gives (named when a run has it), in order.
    found: dict[str, Counter] = {stage.name: Counter() for stage in grid.stages if stage.over.empty}
    for run, config in resolved.items():
        tree = yaml.safe_load(config) or {}
        run_data, model = tree.get("data"), tree.get("model") or {}
        depth = model_depth(model.get("init_args") or {})  # all the checks ask of the model
        for stage in pending.get(run, []):
            key = json.dumps([stage.name, run_data, depth], sort_keys=True, default=str)
            if key not in checked:
                problem = model_problem(stage, run_data, depth)
                checked[key] = DataCheck("error", problem) if problem else _check_stage(stage, run_data, checked)
            found.setdefault(stage.name, Counter())[checked[key]] += 1
    order = {"error": 0, "unchecked": 1, "ok": 2}
    return [StageReport(name, tuple(sorted(counts, key=lambda c: order[c.status]))) for name, counts in found.items()]


def _check_stage(stage: Stage, run_data: dict[str, Any] | None, checked: dict[str, DataCheck]) -> DataCheck:
    from regablate.data.preflight import DataCheck, check_data

    try:
        data = stage_data(stage, run_data)
    except RegablateError as err:
        return DataCheck("error", str(err))
    if data is None:
        return DataCheck("unchecked", f"no data check for command {stage.command}")
    key = json.dumps(data, sort_keys=True, default=str)
    if key not in checked:
        checked[key] = check_data(data)
    return checked[key]


def refusal(reports: list[StageReport]) -> RegablateError | None:
    """The one-line error that stops a sweep whose stages cannot load their data (or fit the model), or None."""
    failed = [r for r in reports if r.failed]
    if not failed:
        return None
    first = next(c for c in failed[0].checks if c.status == "error")
    more = f" (and {len(failed) - 1} more stage(s), see above)" if len(failed) > 1 else ""
    return RegablateError(
        f"preflight: stage {failed[0].stage} cannot run: {first.message}{more}; "
        "fix the data or the grid, or run with --preflight false"
    )
