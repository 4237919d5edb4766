"""From what a user names on the command line (a run folder, a checkpoint, a timm name) to a backbone.

``probe`` and ``inspect`` take the same model arguments (:class:`BackboneSource`) and resolve
them here, by one set of rules:

* a run folder (positional or ``--checkpoint``) or a ``.ckpt`` that regablate wrote (any ``.ckpt``
  when no ``--model`` is given) is built as it was trained (its stored model name, register count
  and sizes), then converted by any ``--num_registers`` / ``--img_size`` / size arguments given;
* a Hugging Face folder (``regablate.models.formats``) is built from its ``config.json``, then
  converted by any ``--num_registers`` / ``--img_size``; ``--model`` and size arguments are refused;
* anything else needs ``--model NAME`` (a timm ViT): with ``--checkpoint FILE`` those weights (timm's
  names or the upstream dinov2/dinov3 repositories', ``regablate.models.upstream``) are converted
  into it; without one, timm's pretrained weights are loaded when ``--pretrained`` is true (the
  default), random weights otherwise;
* the register count defaults to the model's own (4 for timm's ``*_reg4_*``, else 0, or the run's).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from regablate.commands import BackboneSource
from regablate.errors import RegablateError
from regablate.models.backbone import build_backbone
from regablate.models.formats import HubModel, hf_folder, read_hf_folder
from regablate.models.layout import Backbone, global_feature_name, num_registers_of
from regablate.runs import Which, checkpoint_hparams, find_checkpoint, first_line, is_training_checkpoint


@dataclass
class ResolvedBackbone:
    """A built backbone, a short name for output folders, and where it came from (for results files)."""

    model: Backbone
    name: str
    pretrained: bool
    run_dir: Path | None = None
    description: dict[str, Any] = field(default_factory=dict)

    @property
    def normalisation(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """The mean/std the weights expect: timm's data config for its pretrained weights, else ImageNet's
        (what regablate's data modules train with)."""
        if not self.pretrained:
            return IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
        config = timm.data.resolve_model_data_config(self.model)
        return tuple(config["mean"]), tuple(config["std"])


def run_folder(run: str | None, checkpoint: str | None) -> Path | None:
    """The run folder being looked at: ``run``, ``--checkpoint RUN``, or the run holding ``RUN/checkpoints/x.ckpt``."""
    for given in (run, checkpoint):
        if given is not None and Path(given).is_dir():
            return Path(given)
    if checkpoint is not None:
        path = Path(checkpoint)
        if path.parent.name == "checkpoints" and (path.parent.parent / "config.yaml").is_file():
            return path.parent.parent
    return None


def resolve_backbone(
    source: BackboneSource, run: str | None = None, default_img_size: int | None = None
) -> ResolvedBackbone:
    """Build the backbone ``source`` (and an optional positional run folder ``run``) name."""
    if run is not None and source.checkpoint is not None:
        raise RegablateError("give a run folder or --checkpoint, not both")
    given = run if run is not None else source.checkpoint
    path = Path(given).expanduser() if given else None
    if path is not None and not path.exists():
        raise RegablateError(f"{'run folder' if run is not None else 'checkpoint'} not found: {path}")
    hf = hf_folder(path) if path is not None else None
    if hf is not None:
        if source.model:
            raise RegablateError(f"{hf} is a Hugging Face folder: its config.json gives the model; leave out --model")
        hub = read_hf_folder(hf)
        model = _build_hub(hub, hf, num_registers=source.num_registers, **source.sizes())
        description: dict[str, Any] = {"checkpoint": str(hf), "model_name": hub.model_name}
        description["model_kwargs"] = hub.model_kwargs
        return _resolved(model, hf.name, False, None, description)
    folder = run_folder(run, source.checkpoint)
    # Without --model a .ckpt must be regablate's own (reading it says what is wrong if not).
    if path is not None and (is_training_checkpoint(path) or (path.suffix == ".ckpt" and not source.model)):
        checkpoint = find_checkpoint(path, source.which) if path.is_dir() else path
        stored = checkpoint_hparams(checkpoint)["model_name"]
        if source.model and stored != source.model:
            raise RegablateError(f"{path} holds a {stored}, not a {source.model}; leave out --model")
        overrides = source.sizes()
        if source.num_registers is not None:
            overrides["num_registers"] = source.num_registers
        model = load_backbone(checkpoint, **overrides)
        name = path.name if path.is_dir() else path.stem
        description = {"run_dir": str(folder) if folder else None, "checkpoint": str(checkpoint), "model_name": stored}
        return _resolved(model, name, False, folder, description)
    if not source.model:
        raise RegablateError("give --model NAME (a timm ViT), or a run folder / --checkpoint with a regablate .ckpt")
    registers = native_registers(source.model) if source.num_registers is None else int(source.num_registers)
    pretrained = source.pretrained and path is None
    sizes = source.sizes(default_img_size)
    try:
        model = build_backbone(source.model, registers, checkpoint=path, pretrained=pretrained, **sizes)
    except (OSError, RuntimeError, ValueError) as err:
        if not pretrained:
            raise
        raise RegablateError(
            f"cannot load timm's pretrained weights for {source.model} ({first_line(err)}); needs the network or a "
            "filled Hugging Face cache, or pass --checkpoint PATH or --pretrained false (random weights)"
        ) from None
    name = source.model if path is None else path.stem
    description = {"model_name": source.model, "checkpoint": str(path) if path else None, "pretrained": pretrained}
    return _resolved(model, name, pretrained, folder, description)


def _resolved(
    model: Backbone, name: str, pretrained: bool, folder: Path | None, description: dict[str, Any]
) -> ResolvedBackbone:
    description = {
        **description,
        "num_registers": num_registers_of(model),
        "img_size": list(model.patch_embed.img_size),
        "class_token": model.cls_token is not None,
        "global_feature": global_feature_name(model),  # what the probes' "cls" features are
    }
    return ResolvedBackbone(model, name, pretrained, folder, description)


def load_backbone(source: str | Path, which: Which = "best", **overrides: Any) -> Backbone:
    """The backbone of a run folder, a regablate ``.ckpt`` or a Hugging Face folder (DINOv2, DINOv3).

    ``overrides`` replace stored settings (``num_registers`` to convert, ``img_size``, ...); a Hugging
    Face folder takes only those two, its config.json gives the rest.
    """
    path = Path(source)
    folder = hf_folder(path)
    if folder is not None:
        return _build_hub(read_hf_folder(folder), folder, **overrides)
    checkpoint = find_checkpoint(path, which) if path.is_dir() else path
    if not checkpoint.is_file():
        raise RegablateError(f"checkpoint not found: {checkpoint}")
    hparams = checkpoint_hparams(checkpoint)
    settings = {
        "model_name": hparams["model_name"],
        "num_registers": hparams.get("num_registers", 0),
        "img_size": hparams.get("img_size"),
        **(hparams.get("model_kwargs") or {}),
        **overrides,
    }
    if settings["img_size"] is None:
        del settings["img_size"]
    return build_backbone(settings.pop("model_name"), settings.pop("num_registers"), checkpoint=checkpoint, **settings)


def _build_hub(
    hub: HubModel, folder: Path, num_registers: int | None = None, img_size: int | None = None, **sizes: Any
) -> Backbone:
    """A Hugging Face folder's backbone: its config.json gives the sizes, a register count and image size convert it."""
    if sizes:
        raise RegablateError(
            f"{folder} is a Hugging Face folder: its config.json gives {', '.join(sizes)}; leave them out"
        )
    return hub.build(num_registers, img_size)


def native_registers(model_name: str) -> int:
    """The register count timm builds ``model_name`` with (4 for ``*_reg4_*``); 0 for unknown names."""
    if not timm.is_model(model_name):
        return 0  # build_backbone names the problem
    with torch.device("meta"):
        return num_registers_of(timm.create_model(model_name, num_classes=0))
