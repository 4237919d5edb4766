"""Settings of the artifact measures that command lines take: outlier rule, register-neuron search, token probes.

Kept apart from the measures (``regablate.artifacts.stats``, ``regablate.artifacts.register_neurons``)
so that ``regablate inspect`` builds its parser, and refuses a bad rule, without importing torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from regablate.errors import RegablateError

THRESHOLD_MODES = ("relative", "absolute", "percentile")
# Relative: 4x the block's median patch norm. Artifacts sit near 10x (Fig. 3); normal tokens rarely
# pass 2-3x, and the absolute scale drifts ~10x during training, so a ratio is the safe default.
DEFAULT_THRESHOLD_VALUES = {"relative": 4.0, "absolute": 150.0, "percentile": 98.0}


def threshold_value(mode: str, value: float | None) -> float:
    """The number of outlier rule ``mode`` (its default when None), refused when the rule cannot use it."""
    if mode not in THRESHOLD_MODES:
        raise RegablateError(f"unknown threshold mode {mode!r}; use one of {', '.join(THRESHOLD_MODES)}")
    number = float(DEFAULT_THRESHOLD_VALUES[mode] if value is None else value)
    if not math.isfinite(number) or number <= 0 or (mode == "percentile" and number >= 100):
        allowed = "between 0 and 100 (exclusive)" if mode == "percentile" else "a positive number"
        raise RegablateError(f"threshold value for mode {mode!r} must be {allowed}, got {number:g}")
    return number


@dataclass(frozen=True)
class NeuronSearch:
    """How register neurons are found.

    Args:
        top_k: number of (block, unit) pairs to keep.
        outlier_block: block whose output marks the outlier patch tokens (negative counts from the end).
        max_block: deepest block whose units are candidates (default: ``outlier_block``).
        threshold: outlier rule: relative | absolute | percentile (see ``regablate.artifacts.stats.Threshold``).
        threshold_value: the rule's number (default 4 / 150 / 98).
        num_images: images to search on.
    """

    top_k: int = 10
    outlier_block: int = -1
    max_block: int | None = None
    threshold: str = "relative"
    threshold_value: float | None = None
    num_images: int = 32

    def __post_init__(self) -> None:
        if self.top_k < 1 or self.num_images < 1:
            raise RegablateError(
                f"register neuron search needs top_k >= 1 and num_images >= 1, got {self.top_k}, {self.num_images}"
            )
        threshold_value(self.threshold, self.threshold_value)  # a bad rule fails here, not after a forward pass

    def blocks(self, depth: int) -> tuple[int, int]:
        """``(outlier_block, max_block)`` as indices into a model of ``depth`` blocks."""
        from regablate.models.backbone import block_index

        outlier = block_index(self.outlier_block, depth)
        deepest = outlier if self.max_block is None else block_index(self.max_block, depth)
        return outlier, deepest


@dataclass(frozen=True)
class TokenProbes:
    """How the token probes run: the block, the images, the heads (the same flags in inspect and probe).

    Args:
        block: the block whose output tokens are probed (negative counts from the end; -1: the last, what the
            model outputs, as the paper's probes read).
        train_images: images the probes train on.
        test_images: images they are scored on.
        steps: steps of each top-1 probe (AdamW, cosine).
        lr: AdamW learning rate of the top-1 probes (on standardised tokens).
        batch_size: tokens per step of the top-1 probes.
        ridge: L2 penalty of the pixel probe, per training token (the tokens are standardised).
        max_tokens: most training tokens of one kind (a seeded draw above it).
        threshold: outlier rule: relative | absolute | percentile (inspect: its own --threshold).
        threshold_value: the rule's number (default 4 / 150 / 98).
        seed: seed of the heads, their mini-batches and the token draw.
    """

    block: int = -1
    train_images: int = 256
    test_images: int = 128
    steps: int = 300
    lr: float = 1e-2
    batch_size: int = 256
    ridge: float = 1e-3
    max_tokens: int = 32768
    threshold: str = "relative"
    threshold_value: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        threshold_value(self.threshold, self.threshold_value)  # a bad threshold fails here, in one line
        for name in ("train_images", "test_images", "steps", "batch_size", "max_tokens"):
            if getattr(self, name) < 1:
                raise RegablateError(f"--token_probe.{name} must be at least 1, got {getattr(self, name)}")
        for name in ("lr", "ridge"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise RegablateError(f"--token_probe.{name} must be a positive number, got {value}")

    def block_of(self, model: Any) -> int:
        """The probed block's index in ``0..depth-1``; a block outside the model is one line."""
        depth = len(model.blocks)
        if not -depth <= self.block < depth:
            raise RegablateError(
                f"--token_probe.block {self.block} is outside the model's {depth} blocks (give {-depth}..{depth - 1})"
            )
        return self.block % depth
