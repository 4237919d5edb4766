"""Settings of the artifact measures that command lines take: the outlier rule and the register-neuron search.

Kept apart from the measures (``regablate.artifacts.stats``, ``regablate.artifacts.register_neurons``)
so that ``regablate inspect`` builds its parser, and refuses a bad rule, without importing torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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
