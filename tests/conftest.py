"""Shared fixtures: tiny ViT sizes, offline Hugging Face, and a CLI runner."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Nothing may be downloaded in tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
# A ViT small enough for CPU tests: 32 px, 8x8 patches of 4 px, width 32, 2 blocks.
TINY = {"img_size": 32, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}
TINY_MODEL = "vit_tiny_patch16_224"


@pytest.fixture
def tiny_kwargs() -> dict:
    return dict(TINY)


def tiny_fit_args(tmp_path: Path, *extra: str, registers: int = 2) -> list[str]:
    """CLI arguments for a few-step fit of a tiny model on small synthetic scenes."""
    return [
        "--config",
        str(REPO / "tests" / "configs" / "tiny.yaml"),
        "--trainer.logger.init_args.save_dir",
        str(tmp_path / "runs"),
        "--model.num_registers",
        str(registers),
        *extra,
    ]


def write_source_checkpoint(path: Path, model_name: str, img_size: int, model_kwargs: dict, registers: int = 0) -> Path:
    """A trained-looking source model (random weights, no registers) for distillation tests."""
    import torch
    from safetensors.torch import save_file

    from regablate.models import build_backbone

    torch.manual_seed(123)
    model = build_backbone(model_name, registers, img_size=img_size, **model_kwargs)
    save_file(model.state_dict(), path)
    return path
