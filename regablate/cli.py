"""The ``regablate`` command: LightningCLI's fit/validate/test/predict, and the tools beside them.

    regablate fit --config configs/quickstart.yaml      # LightningCLI (regablate.lightning_cli)
    regablate probe RUN                                  # frozen-feature probes (regablate.probe.command)
    regablate inspect --model NAME                       # artifacts of a model (regablate.artifacts.inspect)
    regablate sweep GRID                                 # a register-count grid (regablate.sweep.command)
    regablate report EXPERIMENT                          # its table and Figure 8 (regablate.report.command)

Every error meant for the user (a ``RegablateError``, or a bad argument) ends the command with one
line, ``regablate: error: ...``, and exit code 2.
"""

from __future__ import annotations

import contextlib
import io
import sys
from collections.abc import Callable

from jsonargparse import ArgumentError, Namespace

from regablate.artifacts import inspect as inspect_command
from regablate.commands import modernise, parser_message
from regablate.errors import RegablateError
from regablate.lightning_cli import build_cli
from regablate.probe import command as probe_command
from regablate.report import command as report_command
from regablate.sweep import command as sweep_command

# The tools next to LightningCLI's subcommands: name -> (entry point taking the arguments after the name, help).
TOOLS: dict[str, tuple[Callable[[list[str]], None], str]] = {
    "probe": (probe_command.main, "frozen-feature probes: classification, segmentation, depth, LOST"),
    "inspect": (inspect_command.main, "does a model have artifacts? norms, attention maps, verdict"),
    "sweep": (sweep_command.main, "run a register-count grid (configs/fig8/), locally or on Slurm"),
    "report": (report_command.main, "results.csv, results.md, figure8.png of runs/<experiment>"),
}


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``regablate`` console script and ``python -m regablate``.

    ``regablate TOOL ...`` runs one of ``TOOLS``; anything else goes to LightningCLI.
    """
    argv = list(sys.argv[1:] if args is None else args)
    try:
        if argv and argv[0] in TOOLS:
            TOOLS[argv[0]][0](argv[1:])
        else:
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
    if args and args[0] in TOOLS:
        module = sys.modules[TOOLS[args[0]][0].__module__]
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
