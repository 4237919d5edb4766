"""Grid files: a base run config, axes, stages and launcher settings, expanded into planned runs.

A grid file has a top-level ``grid:`` key, whose mapping is a :class:`GridSpec` (checked by
jsonargparse: a wrong key or type is one line naming its path, e.g. ``grid.launcher.max_parallel``)::

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
        - {name: probe, command: probe, args: {--probe.fast.cls_steps: 300, --probe.probes: [cls, seg]}}
      launcher: {max_parallel: 1, devices_per_run: null, nodes_per_run: 1, max_requeues: 3, slurm: {...}}
      report: {images: null, num_images: 2, paper: false}

A stage's ``args`` map each flag to its value; a list value is a list flag's value
(``--probe.probes: [cls, seg]`` is ``--probe.probes '["cls", "seg"]'``); ``{grid_dir}`` in a value is the
folder of the file that names it. An axis named by a dotted key takes a list of values; any key works,
so a new backbone option becomes an axis without code changes.

A grid may extend another (``extends: paper.yaml``): it runs the other grid's stages under its own
name, and its own keys are merged over the other's by one rule: **mappings merge key by key,
recursively; any other value (a list, a number, a string, null) replaces the other's.** So
``overrides``, ``launcher`` (and its ``slurm``), ``report``, ``axes`` and ``series`` change key by key,
``base`` and an axis's list of values are replaced. ``stage_args: {stage: {flag: value}}`` is merged
by the same rule into the ``args`` of the named stages. A rehearsal of a cluster grid is written
this way, so the two cannot drift apart.

A probe stage with an ``over`` (:class:`StageOver`) runs once per K of each run's registers
(``test_registers: 0..R`` or a list) and per register intervention, each a stage of its own
(``probe_k_k2``, ``probe_tampered_zero``) whose results go beside the run (``<run>_k2/``,
``<run>_zero/``); ``0..R`` is resolved per run, so a K above a run's R never runs, and an explicit
one is refused here. A stage may start from an earlier stage's args (``like: probe``), and an
extending grid may add stages after the other's (``add_stages``), as configs/fig8/interventions.yaml
does on the CPU grid's runs.

regablate 0.2 wrote a stage's ``args`` as a list of command-line words; such a file gets one line
saying what to write instead.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from jsonargparse import ArgumentError, ArgumentParser
from jsonargparse.typing import NonNegativeInt, PositiveInt

from regablate.commands import parser_message
from regablate.errors import RegablateError
from regablate.hparams import plain
from regablate.report.settings import Report
from regablate.runs import REGISTER_KEY, run_name

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
# Commands a stage may run: LightningCLI's on the run's config, and the tools that take a run folder.
StageCommand = Literal["fit", "validate", "test", "predict", "probe", "inspect"]
STAGE_COMMANDS = get_args(StageCommand)
# An axis: a list of values of one dotted key, or labels of bundles of dotted keys (a named axis). Free-form
# values are typed bare ``list``/``dict``: jsonargparse then keeps them as written (with ``Any`` it would turn
# "1" into 1 and instantiate a ``class_path`` mapping, e.g. a callback in ``trainer.callbacks``).
Axis = list | dict
EXPERIMENT = "experiment"  # {experiment} in a grid value: the grid's runs folder, <output>/<grid name>
GRID_DIR = "{grid_dir}"  # in a stage argument: the folder of the grid file that names it
PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_.]*)\}")
RUN_REFERENCE = re.compile(r"\{experiment\}/([^/\s]+)")
SERIES_AXIS = "series"  # the axis a further series' runs carry: its name
ALL_KEPT = "0..R"  # a stage's over.test_registers: every K from 0 to the run's R
OVER_FLAGS = {"test_registers": "--test_registers", "register_intervention": "--register_intervention"}
DEFAULT_SIGNAL_DELAY_S = 90  # submitit's own default warning before a Slurm time limit
DEFAULT_MAX_REQUEUES = 3  # submitit's own default for requeues after a timeout


@dataclass
class StageOver:
    """A probe stage run once per value over each trained run: what its registers keep at test time.

    Args:
        test_registers: K, the registers kept (``--test_registers``): a list, or ``0..R`` for every K
            from 0 to each run's own R. An explicit K above a run's R is refused when the grid loads.
        register_intervention: what replaces the kept registers (``--register_intervention``): zero,
            mean, noise or shuffle. Runs without registers (R = 0, or K = 0) get none.
    """

    test_registers: list[NonNegativeInt] | Literal["0..R"] | None = None
    register_intervention: list[str] | None = None

    @property
    def empty(self) -> bool:
        return self.test_registers is None and self.register_intervention is None


@dataclass
class Stage:
    """One step of every run: a LightningCLI subcommand on the run's config, or a tool on its folder.

    Args:
        command: fit, validate, test or predict (LightningCLI on the run's config), probe or inspect (on its folder).
        name: the stage's name in the run's summary (default: the command).
        args: the command's flags, each mapped to its value (a list for a list flag).
        like: an earlier stage whose args this one starts from, its own merged over them (the ``extends`` rule).
        over: a probe stage only: one probe per value (and per pair of values) of each run, each a stage of its
            own named ``<name>_k<K>``, ``<name>_<intervention>`` or ``<name>_k<K>_<intervention>``, whose
            results go beside the run folder as ``regablate probe`` puts them (``<run>_k<K>/``, ``<run>_<kind>/``).
    """

    command: StageCommand
    name: str = ""
    args: dict = field(default_factory=dict)
    like: str | None = None
    over: StageOver = field(default_factory=StageOver)

    def __post_init__(self) -> None:
        self.name = self.name or self.command

    @property
    def argv(self) -> tuple[str, ...]:
        """``args`` as command-line words: each flag, then its value as text (lists and mappings as JSON)."""
        return tuple(word for flag, value in self.args.items() for word in (flag, _as_word(value)))


def _as_word(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value)  # true/false/null, numbers, and lists/mappings in a form jsonargparse reads


@dataclass
class Launcher:
    """Where and how many runs at once (the sweep's flags of the same names win over these).

    Args:
        max_parallel: runs at once.
        devices_per_run: devices of each run (trainer.devices; on Slurm, tasks per node); null: the config's.
        nodes_per_run: Slurm nodes of each run (trainer.num_nodes).
        max_requeues: Slurm: times a job stopped at its time limit is requeued before its run fails.
        slurm: submitit AutoExecutor parameters of each run's job (timeout_min, slurm_partition, mem_gb, ...).
    """

    max_parallel: PositiveInt = 1
    devices_per_run: PositiveInt | None = None
    nodes_per_run: PositiveInt = 1
    max_requeues: NonNegativeInt = DEFAULT_MAX_REQUEUES
    slurm: dict = field(default_factory=dict)


@dataclass
class Series:
    """A further series of runs in the same experiment: the grid's axes and overrides with its own over them.

    Args:
        base: its own run configs instead of the grid's.
        overrides: dotted config keys over the grid's.
        axes: axes over the grid's (an axis of the same key replaces the grid's).
        stages: the names of the grid's stages it runs (default: all).
        description: free text.
    """

    base: str | list[str] | None = None
    overrides: dict = field(default_factory=dict)
    axes: dict[str, Axis] = field(default_factory=dict)
    stages: list[str] | None = None
    description: str = ""


@dataclass
class GridSpec:
    """The ``grid:`` mapping of a grid file (see the module's docstring; every key but ``name`` may come from
    the grid it ``extends``).

    Args:
        name: the experiment: runs go into <output>/<name>/<run>/.
        base: run configs merged left to right (relative to the grid file).
        overrides: dotted config keys set in every run.
        axes: the grid is the product of its axes.
        stages: run in order, each as its own process.
        launcher: where and how many at once.
        report: the report's settings.
        series: further series of runs, by name.
        extends: a grid file (relative to this one) whose stages this grid runs, its keys merged under this one's.
        stage_args: in an extending grid: flags merged into the args of the named stages ({stage: {flag: value}}).
        add_stages: in an extending grid: stages run after those of the grid it extends.
        description: free text.
    """

    name: str | None = None
    base: str | list[str] | None = None
    overrides: dict = field(default_factory=dict)
    axes: dict[str, Axis] = field(default_factory=dict)
    stages: list[Stage] = field(default_factory=list)
    launcher: Launcher = field(default_factory=Launcher)
    report: Report = field(default_factory=Report)
    series: dict[str, Series] = field(default_factory=dict)
    extends: str | None = None
    stage_args: dict[str, dict] = field(default_factory=dict)
    add_stages: list[Stage] = field(default_factory=list)
    description: str = ""


@dataclass
class PlannedRun:
    """One grid point: its folder name, the values of each axis and the dotted overrides they set."""

    name: str
    axes: dict[str, Any]
    overrides: dict[str, Any]
    needs: tuple[str, ...] = ()  # runs of the grid whose folders the overrides refer to: they run first
    base: list[Path] | None = None  # a series' own run configs (None: the grid's)
    stages: list[Stage] | None = None  # a series' own stages, a subset of the grid's (None: all)

    def matches(self, filters: dict[str, str]) -> bool:
        """``--only`` filters: an axis named by its full key or its last component, value as text."""
        for key, wanted in filters.items():
            found = [v for k, v in self.axes.items() if k == key or k.rsplit(".", 1)[-1] == key]
            if not found or all(str(v) != wanted for v in found):
                return False
        return True


@dataclass
class Grid:
    """A loaded grid file (the grids it extends merged in, paths absolute); ``runs`` is its expanded axes."""

    path: Path
    name: str
    base: list[Path]
    overrides: dict[str, Any]
    axes: dict[str, Axis]
    stages: list[Stage]
    launcher: Launcher
    report: Report
    series: dict[str, Series]
    runs: list[PlannedRun] = field(default_factory=list)

    def base_of(self, run: PlannedRun) -> list[Path]:
        return run.base if run.base is not None else self.base

    def stages_of(self, run: PlannedRun) -> list[Stage]:
        return run.stages if run.stages is not None else self.stages


def is_grid_file(data: Any) -> bool:
    """Grid files carry a top-level ``grid:`` key; run configs never do."""
    return isinstance(data, dict) and "grid" in data


def merge(under: Any, over: Any) -> Any:
    """The ``extends`` rule: mappings merge key by key, recursively; any other value of ``over`` replaces ``under``."""
    if not isinstance(under, dict) or not isinstance(over, dict):
        return over
    return {**under, **{key: merge(under[key], value) if key in under else value for key, value in over.items()}}


def load_grid(path: str | Path) -> Grid:
    """Read and check a grid file (and the grids it extends) and expand its axes; errors name the file and the key."""
    path = Path(path)
    spec = _parse(path, _with_likes(path, _read_grid(path, seen=())))
    for key in ("name", "base", "axes", "stages"):
        if not getattr(spec, key):
            raise RegablateError(f"{path}: grid.{key} is missing")
    _check_axes(path, "grid.axes", spec.axes)
    _check_stages(path, spec.stages)
    for name, series in spec.series.items():
        _check_axes(path, f"grid.series.{name}.axes", series.axes)
        unknown = [stage for stage in series.stages or () if stage not in [s.name for s in spec.stages]]
        if unknown:
            raise RegablateError(
                f"{path}: grid.series.{name}.stages names no stage {', '.join(unknown)}; stages: "
                f"{', '.join(stage.name for stage in spec.stages)}"
            )
    grid = Grid(
        path=path,
        name=str(spec.name),
        base=[Path(p) for p in _as_list(spec.base)],
        overrides=spec.overrides,
        axes=spec.axes,
        stages=spec.stages,
        launcher=Launcher(**plain(dataclasses.asdict(spec.launcher))),  # no constrained int beyond this point
        report=Report(**plain(dataclasses.asdict(spec.report))),
        series=spec.series,
    )
    runs = expand(grid.axes, grid.overrides, link_runs=False)
    for name, series in grid.series.items():
        runs += _series_runs(grid, name, series)
    grid.runs = link(runs)
    if any(not stage.over.empty for stage in grid.stages):
        for run in grid.runs:
            run.stages = _run_stages(path, grid.stages_of(run), run, _registers_of(path, grid, run))
    return grid


def _read_grid(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    """One grid file's ``grid:`` mapping, checked, its paths made absolute, merged over the grid it extends."""
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
    _refuse_argument_lists(path, spec)
    _parse(path, spec)  # this file alone: its errors name it
    spec = _absolute(path, spec)
    if "extends" not in spec:
        for key in ("stage_args", "add_stages"):
            if key in spec:
                raise RegablateError(f"{path}: grid.{key} changes the stages of the grid it extends; give grid.extends")
        return spec
    if "stages" in spec:
        raise RegablateError(
            f"{path}: a grid that extends another runs its stages; change their arguments with grid.stage_args"
        )
    if "name" not in spec:
        raise RegablateError(f"{path}: grid.name is missing (an extending grid writes its own experiment folder)")
    parent = _read_grid((path.parent / str(spec["extends"])).resolve(), seen=(*seen, path.resolve()))
    own = {key: value for key, value in spec.items() if key not in ("extends", "stage_args", "add_stages")}
    stages = _with_stage_args(path, parent.get("stages") or [], spec.get("stage_args") or {})
    return {**merge(parent, own), "stages": [*stages, *(spec.get("add_stages") or [])]}


@cache
def _parser() -> ArgumentParser:
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(GridSpec, "grid")
    return parser


def _parse(path: Path, spec: dict[str, Any]) -> GridSpec:
    """``spec`` checked and built by jsonargparse; a wrong key or type is one line naming the file and the key."""
    parser = _parser()
    try:
        config = parser.parse_object({"grid": copy.deepcopy(spec)})  # jsonargparse changes what it is given
    except ArgumentError as err:
        raise RegablateError(f"{path}: {parser_message(str(err)).removeprefix('--')}") from None  # a key, not a flag
    dropped = _dropped_key(spec, config.grid.as_dict(), "grid")
    if dropped is not None:  # jsonargparse drops an unknown key whose value is an empty mapping
        raise RegablateError(f"{path}: {dropped} is not a key of a grid file (see configs/fig8/cpu.yaml)")
    return parser.instantiate(config).grid


def _dropped_key(given: Any, parsed: Any, where: str) -> str | None:
    """The first key of ``given`` missing from ``parsed`` (the same data as jsonargparse read it), or None."""
    if isinstance(given, dict) and isinstance(parsed, dict):
        for key, value in given.items():
            if key not in parsed:
                return f"{where}.{key}"
            if (found := _dropped_key(value, parsed[key], f"{where}.{key}")) is not None:
                return found
    elif isinstance(given, list) and isinstance(parsed, list):
        for index, (value, kept) in enumerate(zip(given, parsed)):
            if (found := _dropped_key(value, kept, f"{where}[{index}]")) is not None:
                return found
    return None


def _refuse_argument_lists(path: Path, spec: dict[str, Any]) -> None:
    """A stage whose ``args`` are a list of words (regablate 0.2): one line with the mapping to write instead."""
    for index, stage in enumerate(spec.get("stages") or []):
        if isinstance(stage, dict) and isinstance(stage.get("args"), list):
            raise RegablateError(
                f"{path}: grid.stages[{index}].args is a list of command-line words (regablate 0.2); since 0.3 "
                f"it maps each flag to its value: args: {_as_mapping(stage['args'])}"
            )


def _as_mapping(words: list[Any]) -> str:
    """0.2's ``[--flag, value, ...]`` as the YAML mapping that replaces it (``{--flag: value}``)."""
    pairs: dict[str, Any] = {}
    flag = None
    for word in map(str, words):
        if word.startswith("--"):
            flag, _, value = word.partition("=")
            pairs[flag] = yaml.safe_load(value) if value else True
        elif flag is not None:
            pairs[flag] = yaml.safe_load(word)
            flag = None
    text = yaml.safe_dump(pairs, default_flow_style=True, sort_keys=False, width=1_000_000)
    return text.strip()


def _absolute(path: Path, spec: dict[str, Any]) -> dict[str, Any]:
    """``spec`` (checked) with its paths absolute: base configs, report images and ``{grid_dir}`` in stage args."""
    folder = path.parent.resolve()

    def configs(base: str | list[str]) -> list[str]:
        found = [(folder / name).resolve() for name in _as_list(base)]
        for config in found:
            if not config.is_file():
                raise RegablateError(f"{path}: base config not found: {config}")
        return [str(config) for config in found]

    def filled(args: dict[str, Any]) -> dict[str, Any]:
        return {
            flag: value.replace(GRID_DIR, str(folder)) if isinstance(value, str) else value
            for flag, value in (args or {}).items()
        }

    spec = dict(spec)
    if spec.get("base") is not None:
        spec["base"] = configs(spec["base"])
    if (spec.get("report") or {}).get("images"):
        spec["report"] = {**spec["report"], "images": str((folder / spec["report"]["images"]).resolve())}
    for key in ("stages", "add_stages"):
        if spec.get(key):
            spec[key] = [{**stage, "args": filled(stage.get("args"))} for stage in spec[key]]
    if spec.get("stage_args"):
        spec["stage_args"] = {name: filled(args) for name, args in spec["stage_args"].items()}
    if spec.get("series"):
        spec["series"] = {
            name: {**series, "base": configs(series["base"])} if (series or {}).get("base") else series
            for name, series in spec["series"].items()
        }
    return spec


def _with_stage_args(path: Path, stages: list[dict[str, Any]], changes: dict[str, dict[str, Any]]) -> list[Any]:
    """``stages`` with ``changes`` (``{stage: {flag: value}}``) merged into their args by the ``extends`` rule."""
    names = [stage.get("name") or stage["command"] for stage in stages]
    unknown = sorted(set(changes) - set(names))
    if unknown:
        raise RegablateError(f"{path}: grid.stage_args names no stage {', '.join(unknown)}; stages: {', '.join(names)}")
    return [
        {**stage, "args": merge(stage.get("args") or {}, changes.get(name) or {})} for name, stage in zip(names, stages)
    ]


def _with_likes(path: Path, spec: dict[str, Any]) -> dict[str, Any]:
    """``spec`` with each stage that names another (``like``) starting from that stage's args, its own over them."""
    stages: list[dict[str, Any]] = []
    for stage in spec.get("stages") or []:
        like = stage.get("like") if isinstance(stage, dict) else None
        if like is not None:
            earlier = {s.get("name") or s.get("command"): s for s in stages}
            if like not in earlier:
                raise RegablateError(
                    f"{path}: stage {stage.get('name') or stage.get('command')}: like names no earlier stage "
                    f"{like}; earlier: {', '.join(map(str, earlier)) or 'none'}"
                )
            stage = {**stage, "args": merge(earlier[like].get("args") or {}, stage.get("args") or {})}
        stages.append(stage)
    return {**spec, "stages": stages} if "stages" in spec else spec


def _check_axes(path: Path, where: str, axes: dict[str, Axis]) -> None:
    for axis, values in axes.items():
        if not values:
            raise RegablateError(f"{path}: {where}.{axis} needs a non-empty list of values (or of bundles)")
        if isinstance(values, dict) and not all(isinstance(bundle, dict) for bundle in values.values()):
            raise RegablateError(f"{path}: {where}.{axis} maps labels to bundles of dotted keys ({{key: value}})")
        if isinstance(values, list) and len(set(map(str, values))) != len(values):
            raise RegablateError(f"{path}: {where}.{axis} repeats a value: {values}")


def _check_stages(path: Path, stages: list[Stage]) -> None:
    names = [stage.name for stage in stages]
    if len(set(names)) != len(names):
        raise RegablateError(f"{path}: stage names must differ: {names}")
    if stages[0].command != "fit" and any(stage.command == "fit" for stage in stages):
        raise RegablateError(f"{path}: the fit stage must come first")
    for stage in stages:
        words = [flag for flag in stage.args if not flag.startswith("-")]
        if words:
            raise RegablateError(f"{path}: stage {stage.name}: args map flags (--name) to values; {words[0]!r} is none")
        if stage.over.empty:
            continue
        if stage.command != "probe":
            raise RegablateError(f"{path}: stage {stage.name}: over is for probe stages; this one runs {stage.command}")
        taken = [flag for flag in (*OVER_FLAGS.values(), "--output") if flag in stage.args]
        if taken:
            raise RegablateError(
                f"{path}: stage {stage.name}: args give {taken[0]}, which its over sets per probe; drop it from args"
            )
        if stage.over.register_intervention is not None and not stage.over.register_intervention:
            raise RegablateError(f"{path}: stage {stage.name}: over.register_intervention needs a non-empty list")


def _registers_of(path: Path, grid: Grid, run: PlannedRun) -> int:
    """A run's register count R: its axes' and overrides' value, else its base configs' (the last that sets it)."""
    if REGISTER_KEY in run.overrides:
        registers = run.overrides[REGISTER_KEY]
    else:
        registers = None
        for config in grid.base_of(run):
            model = (yaml.safe_load(config.read_text()) or {}).get("model") or {}
            registers = (model.get("init_args") or {}).get("num_registers", registers)
    if not isinstance(registers, int) or isinstance(registers, bool) or registers < 0:
        raise RegablateError(
            f"{path}: run {run.name}: a stage's over needs the run's register count, and {REGISTER_KEY} is "
            f"{registers!r} (set it in grid.overrides, an axis or a base config)"
        )
    return registers


def _run_stages(path: Path, stages: list[Stage], run: PlannedRun, registers: int) -> list[Stage]:
    """``stages`` with each stage that has an ``over`` replaced by its probes for a run of R = ``registers``."""
    found: list[Stage] = []
    for stage in stages:
        if stage.over.empty:
            found.append(stage)
            continue
        ks: list[int | None] = [None]
        if stage.over.test_registers == ALL_KEPT:
            ks = [*range(registers + 1)]
        elif isinstance(stage.over.test_registers, list):
            above = [k for k in stage.over.test_registers if k > registers]
            ks = [*stage.over.test_registers]
            if above:
                raise RegablateError(
                    f"{path}: stage {stage.name}: over.test_registers {above[0]} is above run {run.name}'s "
                    f"{registers} registers (write {ALL_KEPT} for every K up to each run's R)"
                )
        kinds: list[str | None] = (
            [None] if stage.over.register_intervention is None else [*stage.over.register_intervention]
        )
        for k, kind in itertools.product(ks, kinds):
            if kind is not None and (registers == 0 or k == 0):
                continue  # no register to replace
            values = {"test_registers": k, "register_intervention": kind}
            args = {**stage.args, **{OVER_FLAGS[key]: value for key, value in values.items() if value is not None}}
            suffix = ("" if k is None else f"_k{k}") + ("" if kind is None else f"_{kind}")
            found.append(Stage(stage.command, f"{stage.name}{suffix}", args))
    names = [stage.name for stage in found]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise RegablateError(f"{path}: run {run.name}: stage names must differ: {', '.join(repeated)} (from an over)")
    return found


def _series_runs(grid: Grid, name: str, series: Series) -> list[PlannedRun]:
    """The runs of one further series: the grid's axes and overrides with the series' merged over them.

    Each run is named ``<run>_<series>`` and carries the axis ``series: <name>`` (the report's series label).
    """
    runs = expand({**grid.axes, **series.axes}, {**grid.overrides, **series.overrides}, link_runs=False)
    stages = None if series.stages is None else [stage for stage in grid.stages if stage.name in series.stages]
    for run in runs:
        run.name = f"{run.name}_{name}"
        run.axes = {**run.axes, SERIES_AXIS: name}
        run.base = None if series.base is None else [Path(p) for p in _as_list(series.base)]
        run.stages = stages
    return runs


def expand(axes: dict[str, Any], overrides: dict[str, Any], link_runs: bool = True) -> list[PlannedRun]:
    """The product of ``axes`` in file order (the last axis varies fastest), one run per point.

    Text values may name the run's axis values (``{seed_everything}``, ``{num_registers}``: the
    last key component; a bundle axis by its name) and ``{experiment}``, the grid's runs folder.
    A run whose values name ``{experiment}/<other run>`` needs that run: it starts once the other
    is complete (e.g. continued pretraining from ``{experiment}/r0_s{seed_everything}/checkpoints/last.ckpt``).
    """
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
        known = {**values, **{axis.rsplit(".", 1)[-1]: value for axis, value in values.items()}}
        run_overrides = {key: _filled(key, value, known) for key, value in run_overrides.items()}
        runs.append(PlannedRun(run_name(values, labels=bundles), values, run_overrides))
    return link(runs) if link_runs else runs


def link(runs: list[PlannedRun]) -> list[PlannedRun]:
    """Check the runs' folder names are distinct, find what each needs, and order them by it."""
    names = [run.name for run in runs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise RegablateError(f"the axes give several runs the same folder name: {', '.join(duplicates)}")
    for run in runs:
        run.needs = _needs(run, set(names))
    return _in_dependency_order(runs)


def _filled(key: str, value: Any, known: dict[str, Any]) -> Any:
    """A text value with the run's axis values put in; ``{experiment}`` is left for the plan."""
    if not isinstance(value, str):
        return value

    def fill(match: re.Match) -> str:
        name = match.group(1)
        if name == EXPERIMENT:
            return match.group(0)
        if name not in known:
            raise RegablateError(
                f"grid value of {key} names {{{name}}}, which is no axis; known: "
                f"{', '.join('{' + k + '}' for k in [EXPERIMENT, *known])}"
            )
        return str(known[name])

    return PLACEHOLDER.sub(fill, value)


def _needs(run: PlannedRun, names: set[str]) -> tuple[str, ...]:
    """The other runs whose folders ``run``'s values name as ``{experiment}/<run>``."""
    needs = []
    for key, value in run.overrides.items():
        for other in RUN_REFERENCE.findall(value) if isinstance(value, str) else ():
            if other not in names:
                raise RegablateError(f"run {run.name}: {key} names {{experiment}}/{other}, which is no run of the grid")
            if other == run.name:
                raise RegablateError(f"run {run.name}: {key} names its own folder: a run cannot need itself")
            if other not in needs:
                needs.append(other)
    return tuple(needs)


def _in_dependency_order(runs: list[PlannedRun]) -> list[PlannedRun]:
    """The runs in file order, except that a run comes after the runs it needs."""
    ordered: list[PlannedRun] = []
    placed: set[str] = set()
    waiting = list(runs)
    while waiting:
        ready = [run for run in waiting if set(run.needs) <= placed]
        if not ready:
            raise RegablateError(f"runs need each other in a circle: {', '.join(run.name for run in waiting)}")
        ordered += ready
        placed |= {run.name for run in ready}
        waiting = [run for run in waiting if run.name not in placed]
    return ordered


def with_needs(selected: list[PlannedRun], runs: list[PlannedRun]) -> list[PlannedRun]:
    """``selected`` (e.g. by ``--only``) plus every run they need, directly or not, in grid order."""
    by_name = {run.name: run for run in runs}
    wanted = {run.name for run in selected}
    frontier = list(wanted)
    while frontier:
        for need in by_name[frontier.pop()].needs:
            if need not in wanted:
                wanted.add(need)
                frontier.append(need)
    return [run for run in runs if run.name in wanted]


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


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]
