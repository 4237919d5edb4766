"""The ``regablate`` command: LightningCLI's fit/validate/test/predict, and the tools beside them.

    regablate fit --config configs/quickstart.yaml      # LightningCLI (regablate.lightning_cli)
    regablate probe RUN                                  # frozen-feature probes (regablate.probe.command)
    regablate inspect --model NAME                       # artifacts of a model (regablate.artifacts.inspect)
    regablate sweep GRID                                 # a register-count grid (regablate.sweep.command)
    regablate report EXPERIMENT                          # its table and Figure 8 (regablate.report.command)

Every error meant for the user (a ``RegablateError``, or a bad argument) ends the command with one
line, ``regablate: error: ...``, and exit code 2.

The command answers at once: this module imports a command's module only to run it, so
``regablate --help``, a tool's ``--help`` and the refusals made while parsing need neither torch
nor Lightning (the tools' modules import them where the work starts); ``fit``, ``validate``,
``test`` and ``predict`` are LightningCLI's, whose parser is built from the classes themselves.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import sys
from collections.abc import Callable
from types import ModuleType

from jsonargparse import ArgumentError, Namespace

from regablate import DESCRIPTION
from regablate.commands import HELP, modernise, parser_message
from regablate.errors import RegablateError

# LightningCLI's subcommands and the help line of each.
LIGHTNING_SUBCOMMANDS = {
    "fit": "train a model: regablate fit --config FILE (LightningCLI)",
    "validate": "one evaluation epoch over the validation set",
    "test": "one evaluation epoch over the test set",
    "predict": "the model's predictions on its data",
}
# The tools next to LightningCLI's subcommands: name -> (module whose main() takes the arguments after the name, help).
TOOLS: dict[str, tuple[str, str]] = {
    "probe": ("regablate.probe.command", "frozen-feature probes: classification, segmentation, depth, LOST"),
    "inspect": ("regablate.artifacts.inspect", "does a model have artifacts? norms, attention maps, verdict"),
    "sweep": ("regablate.sweep.command", "run a register-count grid (configs/fig8/), locally or on Slurm"),
    "report": ("regablate.report.command", "results.csv, results.md, figure8.png of runs/<experiment>"),
}


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``regablate`` console script and ``python -m regablate``.

    ``regablate TOOL ...`` runs one of ``TOOLS``; anything else goes to LightningCLI (after
    ``--help``, a missing or an unknown command are answered here, without importing it).
    """
    argv = list(sys.argv[1:] if args is None else args)
    try:
        if argv and argv[0] in TOOLS:
            tool_module(argv[0]).main(argv[1:])
        elif _answer_without_lightning(argv):
            return
        else:
            from regablate.lightning_cli import build_cli

            build_cli(args, epilog=_tools_help())
    except ArgumentError as err:
        _fail(parser_message(str(err)))
    except Exception as err:
        user_error = _find_user_error(err)
        if user_error is None:
            raise
        _fail(str(user_error))


def parse_command(args: list[str]) -> Namespace | None:
    """Parse a ``regablate`` command line as :func:`main` would, and run nothing (the docs' test uses it).

    A tool's command line gives its parsed namespace; LightningCLI's subcommands are parsed with
    ``--print_config`` (what it prints is dropped) and give None. Bad arguments raise as in ``main``.
    """
    from regablate.lightning_cli import build_cli

    if args and args[0] in TOOLS:
        module = tool_module(args[0])
        parse = getattr(module, "parse", None)
        if parse is not None:
            return parse(args[1:])
        return module.build_parser().parse_args(
            modernise(args[1:], args[0], getattr(module, "RENAMED", ()), repeatable=("--only",))
        )
    printed = [] if "--print_config" in args else ["--print_config"]
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            build_cli([*args, *printed])
        except SystemExit as exit_:
            if exit_.code not in (0, None):
                raise
    return None


def run_script(function: Callable[..., None], argv: list[str] | None = None) -> None:
    """Entry point of a ``scripts/*.py`` tool: its flags from ``function``'s signature, in the tools' style.

    Bad flags and ``RegablateError`` end it with one line, ``NAME: error: ...``, and exit code 2.
    """
    from regablate.commands import function_arguments, tool_parser

    prog = function.__name__
    parser = tool_parser(prog, (function.__doc__ or "").strip().splitlines()[0])
    parser.prog = prog
    parser.add_function_arguments(function, as_positional=True)
    try:
        function(**function_arguments(parser.parse_args(argv)))
    except ArgumentError as err:
        _fail(parser_message(str(err)), prog)
    except Exception as err:
        user_error = _find_user_error(err)
        if user_error is None:
            raise
        _fail(str(user_error), prog)


def tool_module(name: str) -> ModuleType:
    """The module of tool ``name``, imported now: each tool imports what its work needs, when it runs."""
    return importlib.import_module(TOOLS[name][0])


def _answer_without_lightning(argv: list[str]) -> bool:
    """Print the top-level help, or refuse a missing or unknown command; False when LightningCLI has the command."""
    if argv and argv[0] in HELP:
        print(_top_level_help())
        return True
    if not argv:
        _fail(f"a command is needed: one of {', '.join([*LIGHTNING_SUBCOMMANDS, *TOOLS])} (see regablate --help)")
    if not argv[0].startswith("-") and argv[0] not in LIGHTNING_SUBCOMMANDS:
        choices = ", ".join(repr(name) for name in [*LIGHTNING_SUBCOMMANDS, *TOOLS])
        _fail(f"invalid command: {argv[0]!r} (choose from {choices})")
    return False


def _top_level_help() -> str:
    width = max(len(name) for name in [*LIGHTNING_SUBCOMMANDS, *TOOLS])
    lines = [f"  {name:<{width}}  {text}" for name, text in LIGHTNING_SUBCOMMANDS.items()]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in TOOLS.items()]
    return "\n".join(
        [
            f"usage: regablate [-c CONFIG] {{{','.join(LIGHTNING_SUBCOMMANDS)}}} ... | regablate TOOL ...",
            "",
            DESCRIPTION,
            "",
            "commands (each has --help; fit, validate, test and predict are LightningCLI's):",
            *lines,
        ]
    )


def _tools_help() -> str:
    lines = [f"  regablate {name} ...  {help_text}" for name, (_, help_text) in TOOLS.items()]
    return "more commands (each has --help):\n" + "\n".join(lines)


def _find_user_error(err: BaseException | None) -> RegablateError | None:
    """The RegablateError behind ``err``: jsonargparse wraps errors raised while instantiating."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, RegablateError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def _fail(message: str, prog: str = "regablate") -> None:
    print(f"{prog}: error: {' '.join(message.split())}", file=sys.stderr)
    raise SystemExit(2)
