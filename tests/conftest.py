"""Shared fixtures: tiny ViT sizes, offline Hugging Face, a quiet Trainer and a ``regablate`` subprocess runner.

Tiers: tests marked ``slow`` start real processes (``python -m regablate``: sweeps, DDP, Slurm);
``python -m pytest -q -m "not slow"`` runs the rest, the fast tier.
"""

from __future__ import annotations

import os
import subprocess
import sys
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


@pytest.fixture
def offline_hf(tmp_path, monkeypatch):
    """No network, and every Hugging Face cache under tmp_path (``datasets`` reads its config at import)."""
    import datasets
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def quiet_trainer(steps: int, **overrides):
    """A Lightning Trainer for ``steps`` steps that writes nothing and prints nothing."""
    from lightning import Trainer

    settings = {
        "max_steps": steps,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "limit_val_batches": 0,
        **overrides,
    }
    return Trainer(**settings)


def subprocess_env() -> dict[str, str]:
    """The environment of a regablate process a test starts: one thread, and the repository importable,
    so that grids may name the tests' own callbacks (``tests.signals.Segfault``) from any folder."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}


def run_regablate(
    *args: str, cwd: Path = REPO, timeout: float = 400, check: bool = True
) -> subprocess.CompletedProcess:
    """``python -m regablate ARGS`` as a user runs it, one thread per process (DDP ranks share the cores)."""
    env = subprocess_env()
    command = [sys.executable, "-m", "regablate", *args]
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    if check:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


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


TRAINED_MODEL = "{patch_size: 4, embed_dim: 48, depth: 2, num_heads: 2}"  # 8x8 patches of 4 px at 32 px


@pytest.fixture(scope="session")
def trained_tiny_run(tmp_path_factory) -> Path:
    """A tiny ViT (``TRAINED_MODEL``) fitted for 120 steps on synthetic scenes: a backbone worth probing."""
    from regablate.cli import main

    tmp = tmp_path_factory.mktemp("trained")
    main(
        [
            "fit",
            *tiny_fit_args(tmp),
            *("--model.model_kwargs", TRAINED_MODEL, "--model.lr", "3e-3", "--model.warmup_steps", "10"),
            *("--data.train_size", "4000", "--data.batch_size", "32"),
            *("--trainer.max_steps", "120", "--trainer.val_check_interval", "120"),
        ]
    )
    return next((tmp / "runs" / "tiny").iterdir())


def write_source_checkpoint(path: Path, model_name: str, img_size: int, model_kwargs: dict, registers: int = 0) -> Path:
    """A trained-looking source model (random weights, no registers) for distillation tests."""
    import torch
    from safetensors.torch import save_file

    from regablate.models import build_backbone

    torch.manual_seed(123)
    model = build_backbone(model_name, registers, img_size=img_size, **model_kwargs)
    save_file(model.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def slurm():
    """A one-node Slurm cluster on this machine (Debian's slurm-wlm + munge), or a skip that says why not."""
    from tests import slurm_cluster

    try:
        cluster = slurm_cluster.start()
    except slurm_cluster.Unavailable as why:
        pytest.skip(f"no local Slurm: {why}")
    except (OSError, subprocess.SubprocessError) as err:
        pytest.skip(f"no local Slurm: {err}")
    yield cluster
    cluster.stop()
