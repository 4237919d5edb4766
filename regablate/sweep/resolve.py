"""A grid point's full run config: the base configs and its overrides, resolved by LightningCLI's parser.

Resolving in the sweep process (parse only, nothing instantiated) checks every run's config
before the first one trains and gives each run one self-contained ``sweep_config.yaml``:
``regablate fit --config runs/<experiment>/<run>/sweep_config.yaml`` reproduces it alone.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ArgumentError

from regablate.commands import parser_message
from regablate.errors import RegablateError
from regablate.hparams import plain
from regablate.lightning_cli import RegablateCLI, build_cli
from regablate.sweep.grid import nested


class _ParseOnly(RegablateCLI):
    """Parse and link a config, run the folder-naming hook, instantiate nothing."""

    def instantiate_classes(self) -> None:
        pass


def resolve_config(base: list[Path], overrides: dict[str, Any]) -> str:
    """The YAML text of ``base`` merged left to right with the dotted ``overrides`` on top."""
    fd, overrides_file = tempfile.mkstemp(prefix="regablate-sweep-", suffix=".yaml")
    try:
        with os.fdopen(fd, "w") as handle:
            yaml.safe_dump(nested(overrides), handle)
        args = [arg for path in [*base, overrides_file] for arg in ("--config", str(path))]
        seed_log = logging.getLogger("lightning.fabric.utilities.seed")  # "Seed set to N" once per run
        level = seed_log.level
        seed_log.setLevel(logging.WARNING)
        try:
            with warnings.catch_warnings():
                # LightningCLI warns that the sweep's own sys.argv is set too; only ``args`` are parsed.
                warnings.filterwarnings("ignore", message=".*args parameter is intended.*")
                cli = build_cli(args, run=False, cli_class=_ParseOnly)
        except ArgumentError as err:
            raise RegablateError(parser_message(str(err))) from None
        finally:
            seed_log.setLevel(level)
        config = cli.config.clone()
        for key, value in config.items():  # a value checked for another class keeps its constrained type
            config[key] = plain(value)
        return cli.parser.dump(config, skip_none=False, skip_check=True)
    finally:
        Path(overrides_file).unlink(missing_ok=True)
