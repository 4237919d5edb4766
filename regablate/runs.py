"""Finding what a run folder holds: its checkpoints and the backbone they contain."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from timm.models.vision_transformer import VisionTransformer

from regablate.backbone import build_backbone
from regablate.errors import RegablateError

Which = Literal["best", "last"]


def find_checkpoint(run_dir: str | Path, which: Which = "best") -> Path:
    """``checkpoints/best-*.ckpt`` (newest) or ``checkpoints/last.ckpt`` of a run folder.

    ``best`` falls back to ``last`` when the run saved no best checkpoint.
    """
    folder = Path(run_dir) / "checkpoints"
    if not Path(run_dir).is_dir():
        raise RegablateError(f"run folder not found: {run_dir}")
    candidates = sorted(folder.glob("best-*.ckpt"), key=lambda p: p.stat().st_mtime) if which == "best" else []
    candidates = candidates or [p for p in [folder / "last.ckpt"] if p.is_file()]
    if not candidates:
        raise RegablateError(f"{run_dir} has no checkpoints/last.ckpt or best-*.ckpt: did its fit run?")
    return candidates[-1]


def checkpoint_hparams(path: str | Path) -> dict[str, Any]:
    """The task hyper-parameters stored in a Lightning checkpoint (read without unpickling code)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any read failure is the user's file, reported in one line
        raise RegablateError(f"cannot read checkpoint {path}: {str(err).strip().splitlines()[0]}") from None
    hparams = state.get("hyper_parameters") if isinstance(state, dict) else None
    if not hparams or "model_name" not in hparams:
        raise RegablateError(f"{path} is not a regablate training checkpoint (no model_name in its hyper-parameters)")
    return hparams


def load_backbone(source: str | Path, which: Which = "best", **overrides: Any) -> VisionTransformer:
    """The backbone of a run folder or of a regablate ``.ckpt``, built as it was trained.

    ``overrides`` replace stored settings (``num_registers`` to convert, ``img_size``, ...).
    """
    path = Path(source)
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
