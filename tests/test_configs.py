"""Every shipped YAML under configs/ (and the tests' own) parses and instantiates."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import yaml
from lightning import LightningDataModule, LightningModule, Trainer

from regablate.lightning_cli import RegablateCLI, build_cli
from regablate.sweep.grid import is_grid_file, load_grid
from regablate.sweep.resolve import resolve_config
from tests.conftest import REPO, write_source_checkpoint

QUICKSTART = REPO / "configs" / "quickstart.yaml"
ALL_CONFIGS = sorted((REPO / "configs").rglob("*.yaml")) + sorted((REPO / "tests" / "configs").glob("*.yaml"))
# Grid files (a top-level `grid:`) are `regablate sweep` input, not LightningCLI configs.
GRID_FILES = [path for path in ALL_CONFIGS if is_grid_file(yaml.safe_load(path.read_text()))]
RUN_CONFIGS = [path for path in ALL_CONFIGS if path not in GRID_FILES]


def test_configs_are_found():
    assert QUICKSTART in RUN_CONFIGS
    assert REPO / "configs" / "fig8" / "cpu.yaml" in GRID_FILES


@pytest.mark.parametrize("path", GRID_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_grid_file_loads_and_its_runs_resolve(path: Path):
    grid = load_grid(path)
    assert grid.runs and grid.stages
    # The first and last grid points parse as run configs (base configs + their overrides).
    for run in (grid.runs[0], grid.runs[-1]):
        config = yaml.safe_load(resolve_config(grid.base_of(run), run.overrides))
        assert config["model"]["init_args"]["num_registers"] in (0, 1, 2, 4, 8, 16)


def source_override(config: dict, tmp_path: Path) -> list[str]:
    """A config that starts from a checkpoint made by an earlier run gets a stand-in of the right shape."""
    model = config.get("model", {}).get("init_args", {})
    if "checkpoint" not in model or (model["checkpoint"] and Path(model["checkpoint"]).is_file()):
        return []
    img_size = config["data"]["init_args"]["img_size"]
    path = write_source_checkpoint(
        tmp_path / "source.safetensors",
        model["model_name"],
        img_size,
        model.get("model_kwargs") or {},
        registers=model.get("teacher_registers", 0),
    )
    return ["--model.init_args.checkpoint", str(path)]


def is_cluster_config(config: dict) -> bool:
    """Paper-sized configs ask for GPUs (and hub weights): parsed here, instantiated on a cluster."""
    return config.get("trainer", {}).get("accelerator") == "gpu"


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_config_instantiates(path: Path, tmp_path, monkeypatch):
    config = yaml.safe_load(path.read_text())
    # A fragment (callbacks, trainer settings) is meant to be combined with a full run config.
    base = [] if "model" in config else ["--config", str(QUICKSTART)]
    args = [*base, "--config", str(path), "--trainer.logger.init_args.save_dir", str(tmp_path)]
    if is_cluster_config(config):
        monkeypatch.setattr(RegablateCLI, "instantiate_classes", lambda self: None)
        cli = build_cli(args, run=False)
        model = cli.config.model.init_args
        assert model.num_registers in (0, 1, 2, 4, 8, 16)
        assert timm.is_model(model.model_name), f"{model.model_name} is not a timm model"
        return
    cli = build_cli([*args, *source_override(config, tmp_path)], run=False)
    assert isinstance(cli.model, LightningModule)
    assert isinstance(cli.datamodule, LightningDataModule)
    assert isinstance(cli.trainer, Trainer)
    assert cli.model.hparams.img_size == cli.datamodule.img_size


def test_quickstart_is_what_the_readme_promises():
    config = yaml.safe_load(QUICKSTART.read_text())
    assert config["model"]["init_args"]["num_registers"] == 4
    assert config["data"]["class_path"] == "regablate.data.SyntheticScenes"
    readme = (REPO / "README.md").read_text()
    assert "regablate fit --config configs/quickstart.yaml" in readme


def test_every_shipped_key_is_commented():
    """litgpt-style: each key of a shipped config says what it does."""
    for path in sorted((REPO / "configs").rglob("*.yaml")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            stripped = line.strip()
            if not stripped or stripped.startswith("#") or stripped.startswith("- class_path"):
                continue
            if stripped.endswith(":") or stripped in ("init_args:",):
                continue  # a section header
            assert "#" in line, f"{path.relative_to(REPO)}:{number} has no comment: {line!r}"
