"""One command-line style for every regablate tool (``probe``, ``inspect``, ``sweep``, ``report``).

Each tool's parser is built by jsonargparse from the typed signature of the function that does
the work (and from dataclasses such as ``BackboneSource``), so flags, types, defaults and help
come from one place and read like LightningCLI's: underscores, ``--flag true|false`` for
booleans, constrained numbers (``PositiveInt``, ...) refused at parse time with the constraint
shown in ``--help``. The same thing has the same flag everywhere: ``--output``, ``--checkpoint``,
``--model``, ``--pretrained``.

Spellings of regablate 0.1 (``--dry-run``, ``--out``, ``--no_cache``, ...) still work for one
release: they are rewritten before parsing, with a one-line notice on stderr.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal, get_args

from jsonargparse import ArgumentParser, Namespace
from jsonargparse.typing import NonNegativeInt, PositiveInt

from regablate.hparams import plain
from regablate.runs import Which

DEPRECATED_UNTIL = "0.3"
HELP = ("-h", "--help")
# What --register_intervention replaces the registers by (regablate.models.interventions applies it).
InterventionKind = Literal["none", "zero", "mean", "noise", "shuffle"]
INTERVENTION_KINDS: tuple[str, ...] = get_args(InterventionKind)


@dataclass(frozen=True)
class Renamed:
    """A flag of regablate 0.1: ``old`` is now ``new`` (followed by ``value`` when the old flag took none)."""

    old: str
    new: str
    value: str | None = None

    @property
    def spelling(self) -> str:
        """How to write it now."""
        return f"{self.new} {self.value}" if self.value is not None else self.new


def tool_parser(prog: str, description: str) -> ArgumentParser:
    """An empty parser in regablate's style (errors are raised, not printed, so the CLI reports them in one line)."""
    return ArgumentParser(prog=f"regablate {prog}", description=description, exit_on_error=False, allow_abbrev=False)


def modernise(
    argv: Sequence[str], prog: str, renamed: Sequence[Renamed] = (), repeatable: Sequence[str] = ()
) -> list[str]:
    """``argv`` with old spellings rewritten (each noticed once on stderr) and repeatable list flags appended.

    A boolean flag that 0.1 took bare (``--paper``) and that now takes a value is rewritten only
    where no value follows it. ``repeatable`` flags take one value per use (``--only a=1 --only b=2``);
    they become jsonargparse's append form (``--only+ a=1``) so every use adds to the list.
    """
    out: list[str] = []
    noticed: set[str] = set()
    for index, arg in enumerate(argv):
        flag, sep, value = arg.partition("=")
        rename = next((r for r in renamed if r.old == flag), None)
        if rename is not None and rename.old == rename.new:
            following = argv[index + 1] if index + 1 < len(argv) else ""
            if sep or following.lower() in ("true", "false"):
                rename = None  # already the new form
        if rename is not None:
            if rename.old not in noticed:
                noticed.add(rename.old)
                print(
                    f"regablate {prog}: {rename.old} is deprecated, use {rename.spelling} "
                    f"(the old spelling goes in regablate {DEPRECATED_UNTIL})",
                    file=sys.stderr,
                )
            out.append(rename.new)
            if rename.value is not None:
                out.append(rename.value)
            elif sep:
                out.append(value)
            continue
        if flag in repeatable:
            out.append(f"{flag}+")
            if sep:
                out.append(value)
            continue
        out.append(arg)
    return out


SIZE_ARGUMENTS = ("patch_size", "embed_dim", "depth", "num_heads")


@dataclass
class BackboneSource:
    """The model arguments of ``regablate probe`` and ``regablate inspect`` (resolved by ``regablate.models.resolve``).

    Args:
        checkpoint: weights file (.safetensors/.pt/.pth), a regablate .ckpt, or a run folder.
        which: checkpoint of a run folder: best or last.
        model: timm ViT name (optional for a run folder or regablate .ckpt).
        pretrained: timm's pretrained weights for --model when no --checkpoint is given (needs the hub or its cache).
        num_registers: register tokens R (default: the model's own; other counts are converted).
        img_size: input side in pixels (default: the data's, else the model's).
        model_kwargs: extra timm arguments, as in configs.
        patch_size: timm patch_size (overrides model_kwargs).
        embed_dim: timm embed_dim (overrides model_kwargs).
        depth: timm depth (overrides model_kwargs).
        num_heads: timm num_heads (overrides model_kwargs).
    """

    checkpoint: str | None = None
    which: Which = "best"
    model: str | None = None
    pretrained: bool = True
    num_registers: NonNegativeInt | None = None
    img_size: PositiveInt | None = None
    model_kwargs: dict[str, Any] | None = None
    patch_size: PositiveInt | None = None
    embed_dim: PositiveInt | None = None
    depth: PositiveInt | None = None
    num_heads: PositiveInt | None = None

    def sizes(self, default_img_size: int | None = None) -> dict[str, Any]:
        """The timm size arguments given (``model_kwargs`` under the single size flags), with the image size."""
        sizes = {
            **(self.model_kwargs or {}),
            **{k: getattr(self, k) for k in SIZE_ARGUMENTS if getattr(self, k) is not None},
        }
        img_size = self.img_size or default_img_size
        return plain({**sizes, "img_size": img_size} if img_size else sizes)


BACKBONE_ARGUMENTS = ("run", *(f.name for f in fields(BackboneSource)))


def add_backbone_arguments(parser: ArgumentParser, run_action: type[argparse.Action] | None = None) -> None:
    """The model arguments of ``probe`` and ``inspect``: an optional run folder, then ``BackboneSource``'s flags.

    ``run_action`` (the probe's) is called where the run folder or ``--checkpoint`` is given, with its value.
    """
    if run_action is None:
        parser.add_argument("run", type=str | None, nargs="?", default=None, help="a run folder (or use --checkpoint)")
        parser.add_class_arguments(BackboneSource)
        return
    parser.add_argument("run", nargs="?", default=None, action=run_action, help="a run folder (or use --checkpoint)")
    parser.add_argument(
        "--checkpoint",
        default=None,
        action=run_action,
        help="weights file (.safetensors/.pt/.pth), a regablate .ckpt, or a run folder",
    )
    parser.add_class_arguments(BackboneSource, skip={"checkpoint"})


def backbone_source(cfg: Namespace) -> BackboneSource:
    """The :class:`BackboneSource` a parsed command line names."""
    return BackboneSource(**{f.name: plain(cfg[f.name]) for f in fields(BackboneSource)})


@dataclass(frozen=True)
class RegisterIntervention:
    """The register-intervention flags of ``regablate probe`` and ``regablate inspect``.

    Applied by ``regablate.models.interventions``; each command says where its reference images come from.

    Args:
        register_intervention: replace each register at every block's input from intervention_from_block on by
            zeros, its mean or Gaussian noise (mean and per-channel std over the reference images), or the same
            register of another image in the batch (shuffle).
        intervention_from_block: the first block whose input the intervention replaces (0: before block 0).
        test_registers: run the model with only its first K registers (the others removed from the sequence).
        intervention_images: reference images the mean/noise statistics are taken over (probe: the first of the
            training split; inspect: synthetic training scenes, or the folder's images after the inspected ones).
    """

    register_intervention: InterventionKind = "none"
    intervention_from_block: int = 0
    test_registers: int | None = None
    intervention_images: PositiveInt = 512

    @property
    def folder_suffix(self) -> str:
        """What a default output folder's name gets, so intervened results never land on the plain model's:
        ``_k<K>`` and/or ``_<kind>`` (``_b<block>`` after it from a later block)."""
        suffix = f"_k{self.test_registers}" if self.test_registers is not None else ""
        if self.register_intervention != "none":
            suffix += f"_{self.register_intervention}"
            suffix += f"_b{self.intervention_from_block}" if self.intervention_from_block else ""
        return suffix


INTERVENTION_ARGUMENTS = tuple(f.name for f in fields(RegisterIntervention))


def add_intervention_arguments(parser: ArgumentParser) -> None:
    """``RegisterIntervention``'s flags, top level (``--register_intervention``, ``--test_registers``, ...)."""
    parser.add_class_arguments(RegisterIntervention)


def register_intervention(cfg: Namespace) -> RegisterIntervention:
    """The :class:`RegisterIntervention` a parsed command line names."""
    return RegisterIntervention(**{name: plain(cfg[name]) for name in INTERVENTION_ARGUMENTS})


def function_arguments(cfg: Namespace, skip: Sequence[str] = ()) -> dict[str, Any]:
    """A parsed command line as plain keyword arguments of the tool's function, without ``skip``."""
    return {key: plain(value) for key, value in cfg.as_dict().items() if key not in skip}


_KEY = re.compile(r'Parser key "([\w.]+)"')
_RESTRICTION = re.compile(r"Not of type (\w+): (?:(\S+) )?does not conform to restriction (.+?)(?= - | Given|$)")
_GIVEN = re.compile(r"Given value: (\S+)")
_SUBCLASS = re.compile(
    r"Parser key \"([\w.]+)\".*?Problem with given class_path '([^']+)': (.*?)(?: - Expected a <class 'NoneType'>|$)"
)


def parser_message(message: str) -> str:
    """jsonargparse's report on a bad argument, shortened to the part that names the problem.

    A constrained number says which flag, the value and the constraint
    (``--max_parallel: 0 is not a PositiveInt (v>0)``, ``--model.init_args.lr: -1 is not a PositiveFloat
    (v>0)`` for an argument of a class given by ``class_path``); a subclass argument names its class.
    """
    message = " ".join(message.split())
    restriction = _RESTRICTION.search(message)
    keys = _KEY.findall(message[: restriction.start()]) if restriction else []
    if restriction and keys:
        type_name, value, rule = restriction.groups()
        key = keys[-1]  # the innermost key names the argument
        owner = _SUBCLASS.search(message)
        if owner and len(keys) > 1 and not key.startswith(owner.group(1) + "."):
            key = f"{owner.group(1)}.init_args.{key}"
        if value is None:
            given = _GIVEN.search(message, restriction.end())
            value = given.group(1) if given else "the value"
        return f"--{key}: {value} is not a {type_name} ({rule.strip()})"
    match = _SUBCLASS.search(message)
    if match:
        key, class_path, problem = match.groups()
        return f"{key} ({class_path}): {problem}"
    return message
