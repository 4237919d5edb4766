"""``regablate probe``: frozen-feature probes of a run folder, a checkpoint or a timm model.

    regablate probe runs/quickstart/r4_s0                      # the run's best checkpoint, its own data
    regablate probe RUN --data.test_size 500 --probe.cls_steps 1000
    regablate probe --checkpoint weights.safetensors --model vit_small_patch14_dinov2 --num_registers 4
    regablate probe --model vit_tiny_patch16_224 --pretrained false --patch_size 4 --output runs/probe/random
    regablate probe runs/fig8/r0_s0 --test_time_registers auto   # -> runs/fig8/r0_s0_ttr/

The data default to the run's own data settings (``config.yaml``), else to SyntheticScenes;
``--data`` takes a data config or class and ``--data.*`` overrides single settings.

``--test_time_registers`` probes the backbone with one test-time register (``regablate.artifacts.register_neurons``):
``auto`` finds the register neurons on this backbone first (``--register_neurons.*``, on the first
training images), a path uses a ``register_neurons.json`` found on the same weights. Results go to
their own folder (default: the run folder's name + ``_ttr``), whose ``summary.json`` carries
``test_time_registers: 1``, the register neurons, and the artifact statistics measured with the
register on the search images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml
from jsonargparse import ArgumentParser, Namespace
from lightning import LightningDataModule
from timm.models.vision_transformer import VisionTransformer

from regablate.artifacts import stats
from regablate.artifacts.register_neurons import (
    NEURONS_FILE,
    NeuronSearch,
    RegisterNeurons,
    add_test_time_register,
    find_register_neurons,
    summary_labels,
)
from regablate.artifacts.scan import scan
from regablate.artifacts.stats import Threshold
from regablate.commands import Renamed, add_backbone_arguments, backbone_source, modernise, tool_parser
from regablate.errors import RegablateError
from regablate.models.resolve import ResolvedBackbone, resolve_backbone, run_folder
from regablate.probe.features import ViTExtractor
from regablate.probe.protocol import LinearProbe
from regablate.probe.run import frozen_dataset, run_probe
from regablate.runs import read_summary, update_summary

DEFAULT_DATA = {"class_path": "regablate.data.SyntheticScenes"}
# --test_time_registers value that finds the register neurons on the probed backbone itself.
AUTO = "auto"
RENAMED = (Renamed("--no_cache", "--cache", "false"), Renamed("--cache", "--cache", "true"))


def probe_options(
    output: str | None = None, cache: bool = True, test_time_registers: str | None = None, dataset: str | None = None
) -> None:
    """The probe command's own flags (the model, data and protocol have theirs).

    Args:
        output: results folder (default: the run folder, else runs/probe/<model>_r<R>).
        cache: reuse and store the extracted features in OUTPUT/probe_cache.
        test_time_registers: 'auto' or a register_neurons.json: probe with one test-time register added.
        dataset: name of the probed data in summary.json (default: the data's path); the report overlays the paper's
            values on imagenet-1k, ade20k and nyud.
    """


def build_parser() -> ArgumentParser:
    parser = tool_parser("probe", "Frozen-feature probes (classification, segmentation, depth, LOST) of a backbone.")
    add_backbone_arguments(parser)
    parser.add_function_arguments(probe_options)
    parser.add_class_arguments(NeuronSearch, "register_neurons")
    parser.add_subclass_arguments(LightningDataModule, "data", required=False)
    parser.set_defaults(data=DEFAULT_DATA)
    parser.add_class_arguments(LinearProbe, "probe")
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


def _output_dir(cfg: Namespace, resolved: ResolvedBackbone) -> Path:
    """--output, else the run folder, else ``runs/probe/<model>_r<R>``; ``_ttr`` appended with a test-time register."""
    if cfg.output is not None:
        return Path(cfg.output)
    suffix = "_ttr" if cfg.test_time_registers is not None else ""
    run_dir = resolved.run_dir
    if run_dir is not None:
        return run_dir.with_name(run_dir.name + suffix) if suffix else run_dir
    return Path("runs") / "probe" / f"{resolved.name}_r{resolved.model.num_reg_tokens}{suffix}"


def _add_test_time_register(
    cfg: Namespace, model: VisionTransformer, datamodule: LightningDataModule, source: dict[str, Any], output_dir: Path
) -> dict[str, Any]:
    """Add the test-time register ``cfg`` asks for; return the summary keys that label the results.

    The register neurons are found on (``auto``) and measured on the first training images.
    """
    search = NeuronSearch(**cfg.register_neurons.as_dict())
    dataset = frozen_dataset(datamodule, "train")
    images = torch.stack([dataset[i]["image"] for i in range(min(search.num_images, len(dataset)))])
    if cfg.test_time_registers == AUTO:
        neurons = find_register_neurons(
            model, images, search, model_name=str(source.get("checkpoint") or source.get("model_name"))
        )
    else:
        neurons = RegisterNeurons.load(cfg.test_time_registers)
    add_test_time_register(model, neurons)
    neurons.save(output_dir / NEURONS_FILE)
    moved = scan(model, images, threshold=Threshold(neurons.search.threshold, neurons.search.threshold_value))
    print(
        f"test-time register: {len(neurons.units)} register neurons; "
        f"{moved.stats['artifacts/outlier_frac']:.2%} outliers left"
    )
    return {**summary_labels(neurons), **stats.summary_keys(moved.stats)}


def _check_sizes(model: VisionTransformer, datamodule: LightningDataModule) -> None:
    data_size = getattr(datamodule, "img_size", None)
    model_size = tuple(model.patch_embed.img_size)
    if data_size is not None and not model.dynamic_img_size and (data_size, data_size) != model_size:
        raise RegablateError(
            f"the data's img_size {data_size} differs from the backbone's {model_size[0]}; "
            f"set --data.img_size {model_size[0]} or --img_size {data_size}"
        )


def main(argv: list[str]) -> None:
    """Entry point of ``regablate probe`` (errors surface as RegablateError / ArgumentError)."""
    argv = modernise(argv, "probe", RENAMED)
    parser = build_parser()
    cfg = parser.parse_args(argv)
    run_data = _run_data_config(run_folder(cfg.run, cfg.checkpoint))
    if run_data is not None:  # the run's own data become the default; --data / --data.* still override
        parser.set_defaults(data=run_data)
        cfg = parser.parse_args(argv)
    init = parser.instantiate(cfg)
    datamodule, probe = init.data, init.probe
    resolved = resolve_backbone(backbone_source(cfg), cfg.run, getattr(datamodule, "img_size", None))
    model, source = resolved.model, resolved.description
    _check_sizes(model, datamodule)
    output_dir = _output_dir(cfg, resolved)
    known = read_summary(output_dir)
    identity = {"model_name": source.get("model_name"), "num_registers": source["num_registers"]}
    if (
        resolved.run_dir is not None and output_dir != resolved.run_dir
    ):  # results of a run kept elsewhere still name its seed
        identity["seed"] = read_summary(resolved.run_dir).get("seed")
    update_summary(output_dir, {k: v for k, v in identity.items() if k not in known and v is not None})
    if cfg.test_time_registers is not None:
        update_summary(output_dir, _add_test_time_register(cfg, model, datamodule, source, output_dir))
    report = run_probe(
        ViTExtractor(model),
        datamodule,
        probe,
        output_dir=output_dir,
        patch_size=tuple(model.patch_embed.patch_size),
        data_config=cfg.data.as_dict(),
        use_cache=cfg.cache,
        source=source,
        dataset=cfg.dataset,
    )
    if cfg.test_time_registers is not None:  # a finished row of its own in a grid's report
        update_summary(output_dir, {"status": "complete"})
    for name, value in report.metrics.items():
        print(f"{name}: {value:.4f}" if isinstance(value, float) else f"{name}: {value}")
    for probe_name, reason in report.skipped.items():
        print(f"skipped {probe_name}: {reason}")
    print(f"results: {output_dir / 'summary.json'}, {output_dir / 'probe.json'}")
