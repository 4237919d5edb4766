"""``regablate probe``: frozen-feature probes of a run folder, a checkpoint or a timm model.

    regablate probe runs/quickstart/r4_s0                      # the run's best checkpoint, its own data
    regablate probe RUN --data.test_size 500 --probe.fast.cls_steps 1000
    regablate probe --checkpoint weights.safetensors --model vit_small_patch14_dinov2 --num_registers 4
    regablate probe --model vit_tiny_patch16_224 --pretrained false --patch_size 4 --output runs/probe/random
    regablate probe runs/fig8/r0_s0 --test_time_registers auto   # -> runs/fig8/r0_s0_ttr/
    regablate probe RUN --accelerator gpu --devices 8             # extraction split over 8 GPUs, bf16 autocast
    regablate probe RUN --dry_run true                            # per split: samples, fields, bytes; no work

The data default to the run's own data settings (``config.yaml``), else to SyntheticScenes;
``--data`` takes a data config or class and ``--data.*`` overrides single settings.

``--test_time_registers`` probes the backbone with one test-time register (``regablate.artifacts.register_neurons``):
``auto`` finds the register neurons on this backbone first (``--register_neurons.*``, on the first
training images), a path uses a ``register_neurons.json`` found on the same weights. Results go to
their own folder (default: the run folder's name + ``_ttr``), whose ``summary.json`` carries
``test_time_registers: 1``, the register neurons, and the artifact statistics measured with the
register on the search images.

``--accelerator``, ``--devices`` and ``--precision`` (:class:`~regablate.probe.device.ProbeDevice`)
say where the backbone runs, the register-neuron search included; with several devices each
rank extracts its share of every split (one process per device, the command line re-executed per
rank) and rank 0 trains the heads. Everything that can fail on bad input (arguments, devices,
the model, the data's first samples, free disk space) is checked before any process starts.
Nothing is written to the output folder until the probe has its results.

``--probe.probes`` may add ``token``: the token probes (``regablate.artifacts.token_probes``, settings
``--token_probe.*``) on the first train and scored images, run on rank 0 after the other probes, into
``token_probes.json`` and ``outlier_map.png``, their headline numbers into ``summary.json``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ArgumentError, ArgumentParser, Namespace, dict_to_namespace

from regablate.artifacts.settings import NeuronSearch, TokenProbes
from regablate.commands import (
    HELP,
    Renamed,
    add_backbone_arguments,
    add_intervention_arguments,
    modernise,
    tool_parser,
)
from regablate.errors import RegablateError
from regablate.probe.settings import DeviceSettings, FastSettings, LinearProbe

DEFAULT_DATA = {"class_path": "regablate.data.SyntheticScenes"}
DATA_HELP = (
    "the data: a LightningDataModule class (regablate.data.SyntheticScenes, regablate.data.HFDataModule, ...) "
    "or a config with class_path and init_args; --data.* sets single settings, --data.help CLASS lists them "
    "(default: the run folder's data, else SyntheticScenes)"
)
RENAMED = (
    Renamed("--no_cache", "--cache", "false"),
    Renamed("--cache", "--cache", "true"),
    Renamed("--dry-run", "--dry_run", "true"),
    Renamed("--dry_run", "--dry_run", "true"),
    # regablate 0.2: the fast protocol's settings were --probe.<name>; they are a group of their own now
    *(Renamed(f"--probe.{f.name}", f"--probe.fast.{f.name}") for f in fields(FastSettings)),
)


def probe_options(
    output: str | None = None,
    cache: bool = True,
    test_time_registers: str | None = None,
    dry_run: bool = False,
    dataset: str | None = None,
) -> None:
    """The probe command's own flags (the model, data, devices and protocol have theirs).

    Args:
        output: results folder (default: the run folder, else runs/probe/<model>_r<R>).
        cache: reuse and store the extracted features in OUTPUT/probe_cache (false: a scratch store, deleted after).
        test_time_registers: 'auto' or a register_neurons.json: probe with one test-time register added.
        dry_run: print, per split, the samples, the fields kept and the bytes they take; extract nothing.
        dataset: name of the probed data in summary.json (default: the data's path); the report overlays the paper's
            values on imagenet-1k, ade20k and nyud.
    """


class RunData(argparse.Action):
    """A run folder (or a checkpoint in one) given: its ``config.yaml``'s data become the probe's data.

    They apply where the folder is given, as a config file given there would: ``--data`` and
    ``--data.*`` after it override them (a flag that only the run's data class has included). A
    ``--data`` flag before it would be replaced without a word, so that order is refused.
    """

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: str | None = None) -> None:
        from regablate.models.resolve import run_folder  # torch: only once a run folder or checkpoint is given

        setattr(namespace, self.dest, values)
        if values is None:
            return
        data = _run_data_config(run_folder(None, values) if option_string else run_folder(values, None))
        if data is None:
            return
        if namespace.get("data") != parser.get_defaults().get("data"):
            raise ArgumentError(
                self,
                f"give {option_string or 'the run folder'} before any --data flag: its data are what they change",
            )
        namespace["data"] = dict_to_namespace(data)


def build_parser() -> ArgumentParser:
    """The probe's parser."""
    return _parser(for_help=False)


def _parser(for_help: bool) -> ArgumentParser:
    """``for_help``: ``--data`` described in words, not typed by LightningDataModule (whose import loads torch)."""
    parser = tool_parser("probe", "Frozen-feature probes (classification, segmentation, depth, LOST) of a backbone.")
    add_backbone_arguments(parser, RunData)
    parser.add_function_arguments(probe_options)
    add_intervention_arguments(parser)
    parser.add_class_arguments(DeviceSettings)
    parser.add_class_arguments(NeuronSearch, "register_neurons")
    if for_help:
        parser.add_argument("--data", type=dict | str | None, default=None, help=DATA_HELP)
    else:
        from lightning import LightningDataModule  # torch: the data classes are imported to check their settings

        parser.add_subclass_arguments(LightningDataModule, "data", required=False)
        parser.set_defaults(data=DEFAULT_DATA)
    parser.add_class_arguments(LinearProbe, "probe")
    parser.add_class_arguments(TokenProbes, "token_probe")
    return parser


def _run_data_config(run_dir: Path | None) -> dict[str, Any] | None:
    path = run_dir / "config.yaml" if run_dir is not None else None
    if path is None or not path.is_file():
        return None
    try:
        data = (yaml.safe_load(path.read_text()) or {}).get("data")
    except yaml.YAMLError as err:
        raise RegablateError(f"cannot read {path}: {str(err).splitlines()[0]}") from None
    return data if isinstance(data, dict) and "class_path" in data else None


def parse(argv: list[str], parser: ArgumentParser | None = None) -> Namespace:
    """The probe's command line, parsed once (a run folder's data as the data's defaults) and checked.

    A setting of the protocol not chosen (``--probe.protocol dinov2 --probe.fast.cls_steps 20``) is
    refused here, naming the setting that does apply.
    """
    cfg = (parser or build_parser()).parse_args(modernise(argv, "probe", RENAMED))
    LinearProbe.parsed(cfg.probe.as_dict())
    return cfg


def main(argv: list[str]) -> None:
    """Entry point of ``regablate probe`` (errors surface as RegablateError / ArgumentError)."""
    if any(arg in HELP for arg in argv):
        _parser(for_help=True).print_help()
        sys.exit(0)
    parser = build_parser()
    cfg = parse(argv, parser)
    from regablate.probe.job import run_command  # torch, Lightning and the models: once the line has parsed

    run_command(parser, cfg)
