"""Every shipped YAML under configs/ (and the tests' own) parses and instantiates."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from lightning import LightningDataModule, LightningModule, Trainer

from regablate.cli import build_cli
from tests.conftest import REPO

QUICKSTART = REPO / "configs" / "quickstart.yaml"
RUN_CONFIGS = sorted((REPO / "configs").rglob("*.yaml")) + sorted((REPO / "tests" / "configs").glob("*.yaml"))


def test_configs_are_found():
    assert QUICKSTART in RUN_CONFIGS


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_config_instantiates(path: Path, tmp_path):
    config = yaml.safe_load(path.read_text())
    # A fragment (callbacks, trainer settings) is meant to be combined with a full run config.
    base = [] if "model" in config else ["--config", str(QUICKSTART)]
    cli = build_cli(
        [*base, "--config", str(path), "--trainer.logger.init_args.save_dir", str(tmp_path)],
        run=False,
    )
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
