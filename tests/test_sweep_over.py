"""A probe stage's ``over``: one probe per K of each run's registers and per register intervention.

The slow rehearsal of configs/fig8/interventions.yaml's stages on trained runs
(tests/configs/grid_micro_interventions.yaml) is in tests/test_sweep.py: it reuses that file's swept micro grid.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from regablate.errors import RegablateError
from regablate.sweep.grid import load_grid
from tests.conftest import REPO

MICRO = REPO / "tests" / "configs" / "grid_micro.yaml"
INTERVENTIONS = REPO / "configs" / "fig8" / "interventions.yaml"


def interventions_stages() -> list[dict]:
    """The stages configs/fig8/interventions.yaml adds to the grid it extends, as written there."""
    return yaml.safe_load(INTERVENTIONS.read_text())["grid"]["add_stages"]


def grid_file(tmp_path: Path, body: dict, name: str = "over") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"grid": {"name": name, **body}}, sort_keys=False))
    return path


def test_0_to_r_gives_each_run_one_probe_per_k_and_one_per_intervention(tmp_path):
    path = grid_file(tmp_path, {"extends": str(MICRO), "add_stages": interventions_stages()})
    grid = load_grid(path)
    stages = {run.name: grid.stages_of(run) for run in grid.runs}
    assert [stage.name for stage in stages["r0_s0"]] == ["fit", "probe", "probe_k_k0"]  # nothing to replace at R = 0
    assert [stage.name for stage in stages["r2_s0"]] == [
        "fit",
        "probe",
        *("probe_k_k0", "probe_k_k1", "probe_k_k2"),
        *("probe_tampered_zero", "probe_tampered_mean", "probe_tampered_noise", "probe_tampered_shuffle"),
    ]
    probe, k1, noise = stages["r2_s0"][1], stages["r2_s0"][3], stages["r2_s0"][7]
    assert k1.args == {**probe.args, "--test_registers": 1}  # like: probe, then the value of the over
    assert noise.argv[-2:] == ("--register_intervention", "noise") and "--test_registers" not in noise.args
    assert [stage.name for stage in grid.stages] == ["fit", "probe", "probe_k", "probe_tampered"]


def test_the_micro_rehearsal_adds_the_same_stages_as_the_interventions_grid():
    micro = yaml.safe_load((MICRO.parent / "grid_micro_interventions.yaml").read_text())["grid"]["add_stages"]
    assert micro == interventions_stages()


def test_interventions_grid_reuses_the_cpu_grids_runs_and_probe_flags():
    grid, cpu = load_grid(INTERVENTIONS), load_grid(INTERVENTIONS.parent / "cpu.yaml")
    assert grid.name == cpu.name and [run.name for run in grid.runs] == [run.name for run in cpu.runs]
    r16 = next(run for run in grid.runs if run.name == "r16_s0")
    names = [stage.name for stage in grid.stages_of(r16)]
    assert names[:3] == ["fit", "probe", "probe_ttr"] and names[3:20] == [f"probe_k_k{k}" for k in range(17)]
    assert grid.stages_of(r16)[3].args == {**cpu.stages[1].args, "--test_registers": 0}


def test_a_pair_of_values_is_their_product_and_k_0_gets_no_intervention(tmp_path):
    stage = {"name": "p", "command": "probe", "over": {"test_registers": [0, 1], "register_intervention": ["zero"]}}
    axes = {"model.init_args.num_registers": [2]}
    grid = load_grid(grid_file(tmp_path, {"extends": str(MICRO), "axes": axes, "add_stages": [stage]}))
    (run,) = grid.runs
    (probe,) = grid.stages_of(run)[2:]
    assert probe.name == "p_k1_zero" and probe.argv[-4:] == ("--test_registers", "1", "--register_intervention", "zero")


def test_the_register_count_comes_from_the_base_config_when_no_axis_sets_it(tmp_path):
    stages = [{"command": "fit"}, {"command": "probe", "over": {"test_registers": "0..R"}}]
    base = str(MICRO.parent / "tiny.yaml")  # 2 registers
    grid = load_grid(grid_file(tmp_path, {"base": base, "axes": {"seed_everything": [0]}, "stages": stages}))
    (run,) = grid.runs
    assert [stage.name for stage in grid.stages_of(run)] == ["fit", "probe_k0", "probe_k1", "probe_k2"]


@pytest.mark.parametrize(
    ("stage", "message"),
    [
        (
            {"name": "p", "command": "probe", "over": {"test_registers": [0, 1]}},
            "stage p: over.test_registers 1 is above run r0_s0's 0 registers (write 0..R for every K",
        ),
        (
            {"command": "probe", "over": {"test_registers": "0..K"}},
            'grid.add_stages (regablate.sweep.grid.Stage): Parser key "over.test_registers"',
        ),
        ({"name": "p", "command": "inspect", "over": {"test_registers": "0..R"}}, "over is for probe stages"),
        (
            {"name": "p", "command": "probe", "args": {"--test_registers": 1}, "over": {"test_registers": "0..R"}},
            "args give --test_registers, which its over sets per probe",
        ),
        (
            {"name": "p", "command": "probe", "like": "probe_ttr"},
            "like names no earlier stage probe_ttr; earlier: fit, probe",
        ),
        ({"name": "q_k0", "command": "probe"}, "run r0_s0: stage names must differ: q_k0 (from an over)"),
    ],
)
def test_bad_overs_are_one_line_errors_when_the_grid_loads(tmp_path, stage, message):
    over = {"name": "q", "command": "probe", "over": {"test_registers": "0..R"}}
    stages = [stage, over] if stage.get("name") == "q_k0" else [stage]
    path = grid_file(tmp_path, {"extends": str(MICRO), "add_stages": stages})
    with pytest.raises(RegablateError, match=re.escape(message)) as error:
        load_grid(path)
    assert "\n" not in str(error.value)


def test_added_stages_need_a_grid_to_extend(tmp_path):
    path = grid_file(tmp_path, {"base": str(MICRO.parent / "tiny.yaml"), "add_stages": [{"command": "probe"}]})
    with pytest.raises(RegablateError, match="grid.add_stages changes the stages of the grid it extends"):
        load_grid(path)
