"""``regablate fit|validate|test|predict``: LightningCLI around regablate's tasks, with run-folder conventions.

``--print_memory true`` prints the estimated peak GPU memory per device of the run
(``regablate.memory``) and exits before anything is built.

A run writes ``runs/<experiment>/<run>/``: the resolved ``config.yaml``, ``checkpoints/``
(``last.ckpt`` and the best by ``checkpoint.monitor``), TensorBoard event files and
``summary.json``. The experiment is the logger's ``name``; the run is its ``version``, which
defaults to ``r<num_registers>_s<seed>`` so that re-running a config lands in the same folder.
"""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from jsonargparse import Namespace
from lightning import Callback, LightningDataModule, LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI

from regablate import DESCRIPTION
from regablate.callbacks import RunConfig, RunSummary, TimeLimitCheckpoint
from regablate.errors import RegablateError
from regablate.runs import REGISTER_KEY, SEED_KEY, find_checkpoint, first_line, run_name

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
        parser.add_lightning_class_args(TimeLimitCheckpoint, "time_limit")
        parser.link_arguments("data.init_args.img_size", "model.init_args.img_size")
        parser.add_argument(
            "--print_memory",
            type=bool,
            default=False,
            help="print the estimated peak GPU memory per device of this run (regablate.memory) and exit",
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        """Parse, then refuse a ``ckpt_path`` file that is no Lightning checkpoint before Lightning reads it."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and Path(ckpt_path).is_file():
            check_lightning_checkpoint(Path(ckpt_path))

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.get("print_memory"):
            from regablate.memory import estimate

            print("\n".join(estimate(config.as_dict()).lines()))
            raise SystemExit(0)
        logger = config.trainer.logger
        run_dir = None
        if isinstance(logger, Namespace) and logger.class_path == TENSORBOARD:
            if logger.init_args.version is None:
                registers = config.model.init_args.get("num_registers")
                values = {REGISTER_KEY: registers} if registers is not None else {}
                logger.init_args.version = run_name({**values, SEED_KEY: config.seed_everything})
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
            check_lightning_checkpoint(Path(config.ckpt_path))
        elif ckpt_path not in ("best", "last", "hpc", "registry") and not Path(ckpt_path).is_file():
            raise RegablateError(
                f"ckpt_path not found: {ckpt_path} (give a .ckpt file, or best/last of the run folder)"
            )


def check_lightning_checkpoint(path: Path) -> None:
    """Refuse, in one line, a file that is not a Lightning checkpoint (Lightning's loader would end in a traceback).

    ``torch.load(mmap=True)`` maps the tensors instead of reading them, so this reads only the small
    pickled structure of the file, not a multi-GB checkpoint a second time.
    """
    hint = "give a .ckpt that regablate fit wrote, or best/last of the run folder"
    if not zipfile.is_zipfile(path):  # torch.save has written zip archives since torch 1.6
        raise RegablateError(f"ckpt_path {path} is not a checkpoint (not a torch.save archive); {hint}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        raise RegablateError(
            f"ckpt_path {path} is a corrupt or foreign checkpoint ({type(err).__name__}: {first_line(err)}); {hint}"
        ) from None
    if not isinstance(state, dict) or "state_dict" not in state:
        raise RegablateError(
            f"ckpt_path {path} holds weights, not a Lightning checkpoint (no state_dict) to resume; "
            f"to start from these weights use --model.init_args.checkpoint {path}"
        )


def build_cli(
    args: list[str] | None = None,
    *,
    run: bool = True,
    extra_callbacks: Sequence[Callback] = (),
    cli_class: type[RegablateCLI] = RegablateCLI,
    epilog: str = "",
) -> RegablateCLI:
    """Parse ``args`` (default: ``sys.argv``), instantiate, and run the subcommand when ``run``.

    ``run=False`` parses a config without a subcommand and only instantiates (tests, tools);
    ``extra_callbacks`` are added to the trainer next to the configured ones (benchmarks);
    ``cli_class`` is a RegablateCLI subclass (the sweep's parse-only resolver); ``epilog`` ends ``--help``.
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
        parser_kwargs={
            "exit_on_error": False,
            "allow_abbrev": False,
            "prog": "regablate",
            "description": DESCRIPTION,
            "epilog": epilog,
        },
        run=run,
        args=args,
    )
