"""``regablate probe``: frozen-feature probes of a run folder, a checkpoint or a timm model.

    regablate probe runs/quickstart/r4_s0                      # the run's best checkpoint, its own data
    regablate probe RUN --data.test_size 500 --probe.cls_steps 1000
    regablate probe --checkpoint weights.safetensors --model vit_small_patch14_dinov2 --num_registers 4
    regablate probe --model vit_tiny_patch16_224 --model_kwargs '{patch_size: 4}' --output runs/probe/random
    regablate probe runs/fig8/r0_s0 --test_time_registers auto   # -> runs/fig8/r0_s0_ttr/

The data default to the run's own data settings (``config.yaml``), else to SyntheticScenes;
``--data`` takes a data config or class and ``--data.*`` overrides single settings.

``--test_time_registers`` probes the backbone with one test-time register (``regablate.test_time_registers``):
``auto`` finds the register neurons on this backbone first (``--register_neurons.*``, on the first
training images), a path uses a ``register_neurons.json`` found on the same weights. Results go to
their own folder (default: the run folder's name + ``_ttr``), whose ``summary.json`` carries
``test_time_registers: 1``, the register neurons, and the artifact statistics measured with the
register on the search images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

import torch
import yaml
from jsonargparse import ActionYesNo, ArgumentParser, Namespace
from lightning import LightningDataModule
from timm.models.vision_transformer import VisionTransformer

from regablate import artifacts
from regablate.artifact_scan import scan
from regablate.artifacts import Threshold
from regablate.backbone import build_backbone
from regablate.errors import RegablateError
from regablate.probe.features import ViTExtractor
from regablate.probe.protocol import LinearProbe
from regablate.probe.run import frozen_dataset, run_probe
from regablate.runs import find_checkpoint, load_backbone
from regablate.summary import read_summary, update_summary
from regablate.test_time_registers import (
    NEURONS_FILE,
    NeuronSearch,
    RegisterNeurons,
    add_test_time_register,
    find_register_neurons,
    summary_labels,
)

DEFAULT_DATA = {"class_path": "regablate.data.SyntheticScenes"}
# --test_time_registers value that finds the register neurons on the probed backbone itself.
AUTO = "auto"


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="regablate probe",
        description="Frozen-feature probes (classification, segmentation, depth, LOST) of a backbone.",
        exit_on_error=False,
    )
    parser.add_argument("run_dir", type=Optional[str], nargs="?", default=None, help="a run folder to probe")
    parser.add_argument("--checkpoint", type=Optional[str], default=None, help="a .ckpt/.safetensors/.pt file")
    parser.add_argument("--which", type=Literal["best", "last"], default="best", help="checkpoint of a run folder")
    parser.add_argument("--model", type=Optional[str], default=None, help="timm ViT name (random or --pretrained)")
    parser.add_argument("--pretrained", type=bool, default=False, help="timm's pretrained weights for --model")
    parser.add_argument("--num_registers", type=Optional[int], default=None, help="register count (converts)")
    parser.add_argument("--img_size", type=Optional[int], default=None, help="backbone input size (default: the data's)")
    parser.add_argument("--model_kwargs", type=Optional[dict[str, Any]], default=None, help="timm sizes for --model")
    parser.add_argument("--output", type=Optional[str], default=None, help="results folder (default: the run folder)")
    parser.add_argument("--cache", action=ActionYesNo, default=True, help="reuse/store features in OUTPUT/probe_cache")
    parser.add_argument(
        "--test_time_registers", type=Optional[str], default=None, help=f"'{AUTO}' or a {NEURONS_FILE}: add a test-time register"
    )
    parser.add_class_arguments(NeuronSearch, "register_neurons")
    parser.add_subclass_arguments(LightningDataModule, "data", required=False)
    parser.set_defaults(data=DEFAULT_DATA)
    parser.add_class_arguments(LinearProbe, "probe")
    return parser


def _run_folder(cfg: Namespace) -> Path | None:
    """The run folder being probed: RUN_DIR, or the one holding ``--checkpoint`` (``RUN/checkpoints/x.ckpt``)."""
    if cfg.run_dir is not None:
        return Path(cfg.run_dir)
    if cfg.checkpoint is not None:
        folder = Path(cfg.checkpoint).parent.parent
        if Path(cfg.checkpoint).parent.name == "checkpoints" and (folder / "config.yaml").is_file():
            return folder
    return None


def _run_data_config(run_dir: Path | None) -> dict[str, Any] | None:
    path = run_dir / "config.yaml" if run_dir is not None else None
    if path is None or not path.is_file():
        return None
    try:
        data = (yaml.safe_load(path.read_text()) or {}).get("data")
    except yaml.YAMLError as err:
        raise RegablateError(f"cannot read {path}: {str(err).splitlines()[0]}") from None
    return data if isinstance(data, dict) and "class_path" in data else None


def _backbone(cfg: Namespace, data_img_size: int | None) -> tuple[VisionTransformer, dict[str, Any]]:
    """Build the backbone to probe and a description of where it came from."""
    given = [name for name in ("run_dir", "checkpoint", "model") if cfg[name] is not None]
    if not given or given == ["run_dir", "checkpoint"] or ("run_dir" in given and "model" in given):
        raise RegablateError("give a run folder, or --checkpoint PATH (with --model for a non-regablate file), or --model NAME")
    overrides = {k: cfg[k] for k in ("num_registers", "img_size") if cfg[k] is not None}
    if cfg.model is not None:
        registers = overrides.pop("num_registers", 0)
        img_size = overrides.get("img_size", data_img_size)
        sizes = {**(cfg.model_kwargs or {}), **({"img_size": img_size} if img_size else {})}
        model = build_backbone(cfg.model, registers, checkpoint=cfg.checkpoint, pretrained=cfg.pretrained, **sizes)
        source = {"model_name": cfg.model, "checkpoint": cfg.checkpoint, "pretrained": cfg.pretrained}
    else:
        path = Path(cfg.run_dir) if cfg.run_dir is not None else Path(cfg.checkpoint)
        checkpoint = find_checkpoint(path, cfg.which) if path.is_dir() else path
        model = load_backbone(checkpoint, **overrides)
        source = {"run_dir": cfg.run_dir, "checkpoint": str(checkpoint)}
    return model, {**source, "num_registers": model.num_reg_tokens, "img_size": list(model.patch_embed.img_size)}


def _output_dir(cfg: Namespace, run_dir: Path | None, source: dict[str, Any]) -> Path:
    """--output, else the run folder, else ``runs/probe/<model>_r<R>``; ``_ttr`` appended with a test-time register."""
    if cfg.output is not None:
        return Path(cfg.output)
    suffix = "_ttr" if cfg.test_time_registers is not None else ""
    if run_dir is not None:
        return run_dir.with_name(run_dir.name + suffix) if suffix else run_dir
    name = source.get("model_name") or Path(source["checkpoint"]).stem
    return Path("runs") / "probe" / f"{name}_r{source['num_registers']}{suffix}"


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
        neurons = find_register_neurons(model, images, search, model_name=str(source.get("checkpoint") or source.get("model_name")))
    else:
        neurons = RegisterNeurons.load(cfg.test_time_registers)
    add_test_time_register(model, neurons)
    neurons.save(output_dir / NEURONS_FILE)
    moved = scan(model, images, threshold=Threshold(neurons.search.threshold, neurons.search.threshold_value))
    print(f"test-time register: {len(neurons.units)} register neurons; {moved.stats['artifacts/outlier_frac']:.2%} outliers left")
    return {**summary_labels(neurons), **artifacts.summary_keys(moved.stats)}


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
    parser = build_parser()
    cfg = parser.parse_args(argv)
    run_dir = _run_folder(cfg)
    run_data = _run_data_config(run_dir)
    if run_data is not None:  # the run's own data become the default; --data / --data.* still override
        parser.set_defaults(data=run_data)
        cfg = parser.parse_args(argv)
    init = parser.instantiate_classes(cfg)
    datamodule, probe = init.data, init.probe
    model, source = _backbone(cfg, getattr(datamodule, "img_size", None))
    _check_sizes(model, datamodule)
    output_dir = _output_dir(cfg, run_dir, source)
    known = read_summary(output_dir)
    identity = {"model_name": source.get("model_name"), "num_registers": source["num_registers"]}
    if run_dir is not None and output_dir != run_dir:  # results of a run kept elsewhere still name its seed
        identity["seed"] = read_summary(run_dir).get("seed")
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
    )
    if cfg.test_time_registers is not None:  # a finished row of its own in a grid's report
        update_summary(output_dir, {"status": "complete"})
    for name, value in report.metrics.items():
        print(f"{name}: {value:.4f}" if isinstance(value, float) else f"{name}: {value}")
    for probe_name, reason in report.skipped.items():
        print(f"skipped {probe_name}: {reason}")
    print(f"results: {output_dir / 'summary.json'}, {output_dir / 'probe.json'}")
