"""Grid files: a base run config, axes, stages and launcher settings, expanded into planned runs.

A grid file has a top-level ``grid:`` key::

    grid:
      name: fig8_cpu                    # the experiment: runs/<name>/<run>/
      base: [../quickstart.yaml]        # run configs, merged left to right (paths relative to this file)
      overrides: {trainer.max_steps: 300}   # dotted config keys set in every run
      axes:                             # the product of all axes is the grid
        model.init_args.num_registers: [0, 1, 2, 4, 8, 16]
        seed_everything: [0, 1]
        method:                         # a named axis: each value is a bundle of dotted keys
          distill: {model.class_path: regablate.tasks.Distillation}
          dino: {model.class_path: regablate.tasks.DINO}
      stages:                           # run in order, each as its own process
        - {name: fit, command: fit}
        - {name: probe, command: probe, args: [--probe.cls_steps, "300"]}   # "{grid_dir}": this file's folder
      launcher: {max_parallel: 1, devices_per_run: null, slurm: {...}}
      report: {images: null, num_images: 2, paper: false}

An axis named by a dotted key takes a list of values; any key works, so a new backbone option
becomes an axis without code changes.

A grid may extend another (``extends: paper.yaml``): it runs the other grid's stages with its own
name, and what it gives is merged over the other's: ``overrides``, ``launcher`` and ``report`` key
by key, ``axes`` axis by axis, ``base`` replaced when given; ``stage_args`` changes single flags of
named stages (``{probe_cls: {--probe.cls_steps: 20}}``; null removes a flag). A rehearsal of a
cluster grid is written this way, so the two cannot drift apart.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from regablate.errors import RegablateError

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
# Commands a stage may run: LightningCLI's on the run's config, and the tools that take a run folder.
STAGE_COMMANDS = (*LIGHTNING_COMMANDS, "probe", "inspect")
# Short run-name prefixes of the two axes every Figure 8 grid has.
NAME_PREFIXES = {"model.init_args.num_registers": "r", "seed_everything": "s"}
GRID_KEYS = {
    "name",
    "base",
    "overrides",
    "axes",
    "stages",
    "launcher",
    "report",
    "description",
    "extends",
    "stage_args",
}
LAUNCHER_KEYS = {"max_parallel", "devices_per_run", "slurm"}
REPORT_KEYS = {"images", "num_images", "paper", "enabled"}


@dataclass(frozen=True)
class Stage:
    """One step of every run: a LightningCLI subcommand on the run's config, or a tool on its folder."""

    name: str
    command: str
    args: tuple[str, ...] = ()


@dataclass
class PlannedRun:
    """One grid point: its folder name, the values of each axis and the dotted overrides they set."""

    name: str
    axes: dict[str, Any]
    overrides: dict[str, Any]

    def matches(self, filters: dict[str, str]) -> bool:
        """``--only`` filters: an axis named by its full key or its last component, value as text."""
        for key, wanted in filters.items():
            found = [v for k, v in self.axes.items() if k == key or k.rsplit(".", 1)[-1] == key]
            if not found or all(str(v) != wanted for v in found):
                return False
        return True


@dataclass
class Grid:
    """A parsed grid file; ``runs`` is the expanded product of its axes."""

    path: Path
    name: str
    base: list[Path]
    overrides: dict[str, Any]
    axes: dict[str, Any]
    stages: list[Stage]
    launcher: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)
    runs: list[PlannedRun] = field(default_factory=list)


def is_grid_file(data: Any) -> bool:
    """Grid files carry a top-level ``grid:`` key; run configs never do."""
    return isinstance(data, dict) and "grid" in data


def load_grid(path: str | Path) -> Grid:
    """Read and check a grid file (and the grid it extends) and expand its axes (errors name the file and the key)."""
    grid = _read_grid(Path(path), seen=())
    grid.runs = expand(grid.axes, grid.overrides)
    return grid


def _read_grid(path: Path, seen: tuple[Path, ...]) -> Grid:
    """One grid file as a Grid (no runs yet), every path in it made absolute, merged over what it extends."""
    if not path.is_file():
        raise RegablateError(f"grid file not found: {path}")
    if path.resolve() in seen:
        raise RegablateError(f"{path}: grid.extends goes round in a circle: {' -> '.join(map(str, seen))}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise RegablateError(f"cannot read {path}: {' '.join(str(err).split())}") from None
    if not is_grid_file(data) or not isinstance(data["grid"], dict):
        raise RegablateError(f"{path} is not a grid file: it needs a top-level 'grid:' mapping (see configs/fig8/)")
    spec = data["grid"]
    _check_keys(path, "grid", spec, GRID_KEYS)
    launcher = spec.get("launcher") or {}
    report = spec.get("report") or {}
    _check_keys(path, "grid.launcher", launcher, LAUNCHER_KEYS)
    _check_keys(path, "grid.report", report, REPORT_KEYS)
    if report.get("images"):
        report = {**report, "images": str((path.parent / report["images"]).resolve())}
    if "extends" not in spec:
        if "stage_args" in spec:
            raise RegablateError(
                f"{path}: grid.stage_args changes the stages of the grid it extends; give grid.extends"
            )
        for required in ("name", "base", "axes", "stages"):
            if required not in spec:
                raise RegablateError(f"{path}: grid.{required} is missing")
        return Grid(
            path=path,
            name=str(spec["name"]),
            base=_base_configs(path, spec["base"]),
            overrides=dict(spec.get("overrides") or {}),
            axes=_check_axes(path, spec["axes"]),
            stages=_parse_stages(path, spec["stages"]),
            launcher=launcher,
            report=report,
        )
    if "stages" in spec:
        raise RegablateError(
            f"{path}: a grid that extends another runs its stages; change their arguments with grid.stage_args"
        )
    if "name" not in spec:
        raise RegablateError(f"{path}: grid.name is missing (an extending grid writes its own experiment folder)")
    parent = _read_grid((path.parent / str(spec["extends"])).resolve(), seen=(*seen, path.resolve()))
    axes = {**parent.axes, **_check_axes(path, spec["axes"])} if "axes" in spec else parent.axes
    slurm = {**(parent.launcher.get("slurm") or {}), **(launcher.get("slurm") or {})}
    return Grid(
        path=path,
        name=str(spec["name"]),
        base=_base_configs(path, spec["base"]) if "base" in spec else parent.base,
        overrides={**parent.overrides, **(spec.get("overrides") or {})},
        axes=axes,
        stages=_changed_stages(path, parent.stages, spec.get("stage_args") or {}),
        launcher={**parent.launcher, **launcher, **({"slurm": slurm} if slurm else {})},
        report={**parent.report, **report},
    )


def _base_configs(path: Path, base: Any) -> list[Path]:
    configs = [(path.parent / p).resolve() for p in _as_list(base)]
    for config in configs:
        if not config.is_file():
            raise RegablateError(f"{path}: base config not found: {config}")
    return configs


def _changed_stages(path: Path, stages: list[Stage], changes: Any) -> list[Stage]:
    """``stages`` with ``changes`` (``{stage: {flag: value}}``) applied: each flag's value replaced,
    added when the stage lacks the flag, or removed with its value when the new value is null."""
    if not isinstance(changes, dict):
        raise RegablateError(f"{path}: grid.stage_args maps stage names to {{--flag: value}} mappings")
    names = [stage.name for stage in stages]
    unknown = sorted(set(changes) - set(names))
    if unknown:
        raise RegablateError(f"{path}: grid.stage_args names no stage {', '.join(unknown)}; stages: {', '.join(names)}")
    changed = []
    for stage in stages:
        args = list(stage.args)
        flags = changes.get(stage.name) or {}
        if not isinstance(flags, dict):
            raise RegablateError(f"{path}: grid.stage_args.{stage.name} must map flags to values")
        for flag, value in flags.items():
            index = args.index(flag) if flag in args else None
            if value is None:
                if index is not None:
                    del args[index : index + 2]
                continue
            text = _grid_dir(path, value)
            if index is None:
                args += [flag, text]
            else:
                args[index + 1] = text
        changed.append(Stage(stage.name, stage.command, tuple(args)))
    return changed


def _grid_dir(path: Path, value: Any) -> str:
    """A stage argument as text, with ``{grid_dir}`` (the folder of the file that names it) filled in."""
    return str(value).replace("{grid_dir}", str(path.parent.resolve()))


def expand(axes: dict[str, Any], overrides: dict[str, Any]) -> list[PlannedRun]:
    """The product of ``axes`` in file order (the last axis varies fastest), one run per point."""
    choices = [
        list(values.items()) if isinstance(values, dict) else [(v, v) for v in values] for values in axes.values()
    ]
    bundles = {axis for axis, values in axes.items() if isinstance(values, dict)}
    runs = []
    for point in itertools.product(*choices):
        values = {axis: label for axis, (label, _) in zip(axes, point)}
        run_overrides = dict(overrides)
        for axis, (_, value) in zip(axes, point):
            run_overrides.update(value if isinstance(axes[axis], dict) else {axis: value})
        runs.append(PlannedRun(run_name(values, bundles), values, run_overrides))
    names = [run.name for run in runs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise RegablateError(f"the axes give several runs the same folder name: {', '.join(duplicates)}")
    return runs


def run_name(values: dict[str, Any], bundles: set[str] = frozenset()) -> str:
    """``r4_s0`` for registers and seed (the CLI's own default); a bundle axis adds its label,
    any other axis ``<last key component>-<value>``."""
    parts = []
    for axis, value in values.items():
        if axis in bundles:
            parts.append(str(value))
        else:
            parts.append(NAME_PREFIXES.get(axis, axis.rsplit(".", 1)[-1] + "-") + str(value))
    return "_".join(part.replace("/", "-") for part in parts) or "run"


def nested(dotted: dict[str, Any]) -> dict[str, Any]:
    """``{"a.b": 1}`` -> ``{"a": {"b": 1}}``, the shape of a YAML config."""
    tree: dict[str, Any] = {}
    for key, value in dotted.items():
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RegablateError(f"config key {key} crosses the value of {part}")
        node[leaf] = value
    return tree


def _check_axes(path: Path, axes: Any) -> dict[str, Any]:
    if not isinstance(axes, dict) or not axes:
        raise RegablateError(f"{path}: grid.axes must map config keys to lists of values")
    for axis, values in axes.items():
        if isinstance(values, dict):
            if not values or not all(isinstance(bundle, dict) for bundle in values.values()):
                raise RegablateError(f"{path}: axis {axis} maps labels to {{dotted.key: value}} bundles")
        elif not isinstance(values, list) or not values:
            raise RegablateError(f"{path}: axis {axis} needs a non-empty list of values")
        elif len(set(map(str, values))) != len(values):
            raise RegablateError(f"{path}: axis {axis} repeats a value: {values}")
    return dict(axes)


def _parse_stages(path: Path, stages: Any) -> list[Stage]:
    if not isinstance(stages, list) or not stages:
        raise RegablateError(f"{path}: grid.stages must be a list such as [{{name: fit, command: fit}}]")
    parsed = []
    for entry in stages:
        if not isinstance(entry, dict) or "command" not in entry:
            raise RegablateError(f"{path}: each stage needs a command (one of {', '.join(STAGE_COMMANDS)})")
        command = entry["command"]
        if command not in STAGE_COMMANDS:
            raise RegablateError(f"{path}: unknown stage command {command!r}; use {', '.join(STAGE_COMMANDS)}")
        args = tuple(_grid_dir(path, arg) for arg in entry.get("args") or ())
        parsed.append(Stage(str(entry.get("name", command)), command, args))
    names = [stage.name for stage in parsed]
    if len(set(names)) != len(names):
        raise RegablateError(f"{path}: stage names must differ: {names}")
    if parsed[0].command != "fit" and any(stage.command == "fit" for stage in parsed):
        raise RegablateError(f"{path}: the fit stage must come first")
    return parsed


def _check_keys(path: Path, where: str, mapping: Any, allowed: set[str]) -> None:
    if not isinstance(mapping, dict):
        raise RegablateError(f"{path}: {where} must be a mapping")
    unknown = sorted(set(mapping) - allowed)
    if unknown:
        raise RegablateError(
            f"{path}: unknown key(s) {', '.join(unknown)} in {where}; known: {', '.join(sorted(allowed))}"
        )


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]
