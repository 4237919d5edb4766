"""The ``regablate`` command: LightningCLI's fit/validate/test/predict around regablate's tasks.

A run writes ``runs/<experiment>/<run>/``: the resolved ``config.yaml``, ``checkpoints/``
(``last.ckpt`` and the best by ``checkpoint.monitor``), TensorBoard event files and
``summary.json``. The experiment is the logger's ``name``; the run is its ``version``, which
defaults to ``r<num_registers>_s<seed>`` so that re-running a config lands in the same folder.
"""

from __future__ import annotations

import importlib
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from jsonargparse import ArgumentError, Namespace
from lightning import Callback, LightningDataModule, LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from regablate.callbacks import RunConfig, RunSummary
from regablate.errors import RegablateError
from regablate.runs import find_checkpoint

DESCRIPTION = "Fine-tune and ablate register tokens in Vision Transformers."
# Commands next to LightningCLI's fit/validate/test/predict: name -> ("module:function(argv)", help).
TOOLS: dict[str, tuple[str, str]] = {
    "probe": ("regablate.probe:main", "frozen-feature probes: classification, segmentation, depth, LOST"),
    "inspect": ("regablate.inspect:main", "does a model have artifacts? norms, attention maps, verdict"),
    "sweep": ("regablate.sweep.command:main", "run a register-count grid (configs/fig8/), locally or on Slurm"),
    "report": ("regablate.sweep.report:main", "results.csv, results.md, figure8.png of runs/<experiment>"),
}
TENSORBOARD = "lightning.pytorch.loggers.TensorBoardLogger"
DEFAULT_LOGGER = {
    "class_path": TENSORBOARD,
    "init_args": {"save_dir": "runs", "name": "default", "default_hp_metric": False},
}


class RegablateCLI(LightningCLI):
    """LightningCLI with regablate's run-folder conventions."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.filename": "best-{epoch}-{step}"})
        parser.add_lightning_class_args(RunSummary, "summary")
        parser.link_arguments("data.init_args.img_size", "model.init_args.img_size")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        logger = config.trainer.logger
        run_dir = None
        if isinstance(logger, Namespace) and logger.class_path == TENSORBOARD:
            if logger.init_args.version is None:
                registers = config.model.init_args.get("num_registers")
                run = f"r{registers}" if registers is not None else "run"
                logger.init_args.version = f"{run}_s{config.seed_everything}"
            run_dir = Path(logger.init_args.save_dir) / logger.init_args.name / str(logger.init_args.version)
        if config.trainer.fast_dev_run:
            # A smoke test has no run folder; Lightning would still write last.ckpt into the cwd.
            config.checkpoint.save_last = False
        ckpt_path = config.get("ckpt_path")
        if ckpt_path is None:
            return
        if ckpt_path in ("best", "last") and self.subcommand != "fit" and run_dir is not None:
            # Lightning knows "best" only inside the process that trained; the run folder knows it always.
            config.ckpt_path = str(find_checkpoint(run_dir, ckpt_path))
        elif ckpt_path not in ("best", "last", "hpc", "registry") and not Path(ckpt_path).is_file():
            raise RegablateError(f"ckpt_path not found: {ckpt_path} (give a .ckpt file, or best/last of the run folder)")


def build_cli(
    args: list[str] | None = None,
    *,
    run: bool = True,
    extra_callbacks: Sequence[Callback] = (),
    cli_class: type[RegablateCLI] = RegablateCLI,
) -> RegablateCLI:
    """Parse ``args`` (default: ``sys.argv``), instantiate, and run the subcommand when ``run``.

    ``run=False`` parses a config without a subcommand and only instantiates (tests, tools);
    ``extra_callbacks`` are added to the trainer next to the configured ones (benchmarks);
    ``cli_class`` is a RegablateCLI subclass (the sweep's parse-only resolver).
    """
    trainer_defaults: dict[str, Any] = {"logger": DEFAULT_LOGGER}
    if extra_callbacks:
        trainer_defaults["callbacks"] = list(extra_callbacks)
    return cli_class(
        model_class=LightningModule,
        subclass_mode_model=True,
        datamodule_class=LightningDataModule,
        subclass_mode_data=True,
        save_config_callback=RunConfig,
        save_config_kwargs={"overwrite": True},
        trainer_defaults=trainer_defaults,
        auto_configure_optimizers=False,
        parser_kwargs={"exit_on_error": False, "prog": "regablate", "description": DESCRIPTION, "epilog": _tools_help()},
        run=run,
        args=args,
    )


def _tools_help() -> str:
    lines = [f"  regablate {name} ...  {help_text}" for name, (_, help_text) in TOOLS.items()]
    return "more commands (each has --help):\n" + "\n".join(lines) if lines else ""


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``regablate`` console script and ``python -m regablate``.

    ``regablate TOOL ...`` runs one of ``TOOLS``; anything else goes to LightningCLI.
    """
    argv = list(sys.argv[1:] if args is None else args)
    try:
        if argv and argv[0] in TOOLS:
            module, function = TOOLS[argv[0]][0].split(":")
            getattr(importlib.import_module(module), function)(argv[1:])
        else:
            build_cli(args)
    except ArgumentError as err:
        _fail(_parser_message(str(err)))
    except Exception as err:
        user_error = _find_user_error(err)
        if user_error is None:
            raise
        _fail(str(user_error))


def _find_user_error(err: BaseException | None) -> RegablateError | None:
    """The RegablateError behind ``err``: jsonargparse wraps errors raised while instantiating."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, RegablateError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def _parser_message(message: str) -> str:
    """Shorten jsonargparse's report on a subclass argument to the part that names the problem."""
    message = " ".join(message.split())
    match = re.search(r"Parser key \"(\w+)\".*?Problem with given class_path '([^']+)': (.*?)(?: - Expected a <class 'NoneType'>|$)", message)
    if match:
        key, class_path, problem = match.groups()
        return f"{key} ({class_path}): {problem}"
    return message


def _fail(message: str) -> None:
    print(f"regablate: error: {' '.join(message.split())}", file=sys.stderr)
    raise SystemExit(2)

