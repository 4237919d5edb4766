"""``OutlierNormMonitor``: high-norm (artifact) tokens of every block, watched while a model trains."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from jsonargparse.typing import PositiveFloat, PositiveInt
from lightning import LightningModule, Trainer
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from regablate.artifacts.pictures import position_grid
from regablate.artifacts.scan import measured_blocks, scan
from regablate.artifacts.stats import (
    Threshold,
    block_key,
    flatten_statistics,
    norm_statistics,
    summary_keys,
    token_norms,
)
from regablate.callbacks.fixed_images import FixedImagesCallback, backbone_of, tensorboards
from regablate.errors import RegablateError
from regablate.models.layout import Backbone, TokenLayout
from regablate.runs import RunRecord

TRAIN_BATCH_PREFIX = "artifacts/train_batch"


class OutlierNormMonitor(FixedImagesCallback):
    """Log outlier-token statistics of the backbone on a fixed batch of validation images.

    At train start, every ``every_n_steps`` optimiser steps, at every validation end and at
    fit end, one inference pass over the first ``num_images`` validation samples (the same
    ones all run long) measures every block's pre-norm residual stream. Logged through every
    logger at ``trainer.global_step``:

    * ``artifacts/outlier_frac/block_NN``, ``artifacts/norm_max_over_median/block_NN``,
      ``artifacts/patch_norm_median/block_NN``, register norms ``artifacts/register_norm_{mean,max}/block_NN``,
      and each one for the last block without the ``/block_NN`` suffix;
    * ``artifacts/outlier_onset_block``: the first block from which all blocks have outliers;
    * what tells register-style artifacts from other high-norm tokens (last block, see
      ``regablate.artifacts.outlier_evidence``): ``artifacts/outlier_background_share`` (when the
      data has masks), ``artifacts/outlier_neighbour_cosine``, ``artifacts/outlier_channel_concentration``,
      ``artifacts/outlier_attention_share`` / ``_lift``, with ``artifacts/patch_*`` baselines, and
      with registers ``artifacts/patch_register_attention`` and (with a class token)
      ``artifacts/cls_register_attention``;
    * TensorBoard only: histograms ``artifacts/patch_norms/block_NN`` and the image
      ``artifacts/outlier_positions`` (how often each patch position is an outlier, a tile per block).

    With ``train_batch_every_n_steps``, the norm statistics (``outlier_frac``,
    ``norm_max_over_median``, ``patch_norm_median``, register norms, ``outlier_onset_block``) are
    also read from the training forward itself, every that many steps, and logged as
    ``artifacts/train_batch/...`` at the step whose weights produced them. Forward hooks on the
    blocks take the token norms of the first backbone forward of the step (for DINO: the teacher
    on the global crops), so no extra pass runs: cheap enough for every step (1-2 % of a quickstart
    step, ``benchmarks/monitor_overhead.py``), where a fixed-image scan every step costs a
    forward of ``num_images`` images each time. These cover rank zero's training batch, which
    changes every step, so they are noisier than the fixed-image values.

    At fit end the last-block values, ``artifacts/outlier_frac/block_NN`` and ``artifacts/step``
    are merged into the run's ``summary.json`` (rank zero; not under ``fast_dev_run``).
    Statistics cover rank zero's fixed images only (see ``FixedImagesCallback``).

    Args:
        every_n_steps: optimiser steps between measurements (null: validation ends only).
        num_images: validation images measured each time.
        threshold: outlier rule: ``relative`` (x the block's median patch norm), ``absolute``
            (a norm; the paper uses 150 for DINOv2-g) or ``percentile``.
        threshold_value: the rule's number (null: 4 / 150 / 98).
        blocks: block indices to measure (negative from the end; null: all). The last block is always measured.
        histograms: log the norm histograms and the position image (TensorBoard).
        train_batch_every_n_steps: optimiser steps between readings of the training forward (null: off; 1: every step).
    """

    def __init__(
        self,
        every_n_steps: PositiveInt | None = 100,
        num_images: PositiveInt = 16,
        threshold: str = "relative",
        threshold_value: PositiveFloat | None = None,
        blocks: Sequence[int] | None = None,
        histograms: bool = True,
        train_batch_every_n_steps: PositiveInt | None = None,
    ) -> None:
        super().__init__(num_images, every_n_steps)
        if train_batch_every_n_steps is not None and train_batch_every_n_steps < 1:
            raise RegablateError(
                "OutlierNormMonitor: train_batch_every_n_steps must be at least 1 or null, "
                f"got {train_batch_every_n_steps}"
            )
        self.threshold = Threshold(threshold, threshold_value)
        self.blocks = None if blocks is None else list(blocks)
        self.histograms = histograms
        self.train_batch_every_n_steps = train_batch_every_n_steps
        self.latest: dict[str, float] = {}
        self._tap: BlockNormTap | None = None
        self.last_train_batch_step: int | None = None

    def measure(self, trainer: Trainer, pl_module: LightningModule, step: int) -> None:
        images, segmentation = self.images(pl_module)
        result = scan(
            backbone_of(pl_module), images, threshold=self.threshold, blocks=self.blocks, segmentation=segmentation
        )
        self.latest = {**result.stats, "artifacts/step": float(step)}
        for logger in trainer.loggers:
            logger.log_metrics(result.stats, step=step)
        if not self.histograms:
            return
        for writer in tensorboards(trainer):
            for block, norms in result.patch_norms.items():
                writer.add_histogram(block_key("patch_norms", block), norms, step)
            writer.add_image("artifacts/outlier_positions", position_grid(result.outlier_positions), step)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        every = self.train_batch_every_n_steps
        step = trainer.global_step
        due = every and trainer.is_global_zero and step % every == 0
        if due and self._tap is None and self.last_train_batch_step != step:  # once per step under accumulation
            self.last_train_batch_step = step
            self._tap = BlockNormTap(backbone_of(pl_module), self.blocks)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._tap is not None:
            norms, self._tap = self._tap.close(), None
            if norms:
                self.log_train_batch(trainer, TokenLayout.of(backbone_of(pl_module)), norms)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def log_train_batch(self, trainer: Trainer, layout: TokenLayout, norms: dict[int, Tensor]) -> None:
        blocks = sorted(norms)
        per_block, _ = norm_statistics(torch.stack([norms[block] for block in blocks]), layout, self.threshold)
        stats = flatten_statistics(dict(zip(blocks, per_block)), {}, prefix=TRAIN_BATCH_PREFIX)
        for logger in trainer.loggers:
            logger.log_metrics(stats, step=self.last_train_batch_step)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._tap is not None:  # a step that never ended (an exception, a stop signal)
            self._tap.close()
            self._tap = None

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._maybe_measure(trainer, pl_module)
        if getattr(trainer, "fast_dev_run", False):
            return
        log_dir = trainer.log_dir  # a collective call under DDP: every rank must make it
        if self.latest and trainer.is_global_zero and log_dir is not None:
            RunRecord(log_dir).update(summary_keys(self.latest))


class BlockNormTap:
    """Forward hooks that keep the token norms ``(B, T)`` of the first call of each chosen block.

    Made for one training step and closed at its end, so steps that are not measured run no hook.
    The norms are taken from the detached block output: the training graph is untouched.
    """

    def __init__(self, model: Backbone, blocks: Sequence[int] | None) -> None:
        self.norms: dict[int, Tensor] = {}
        wanted = measured_blocks(len(model.blocks), blocks)
        self.handles: list[RemovableHandle] = [model.blocks[b].register_forward_hook(self._keeper(b)) for b in wanted]

    def _keeper(self, block: int):
        def keep(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            if block not in self.norms:
                self.norms[block] = token_norms(output.detach())

        return keep

    def close(self) -> dict[int, Tensor]:
        """Remove the hooks; the norms each block produced (empty when the backbone did not run)."""
        for handle in self.handles:
            handle.remove()
        self.handles = []
        return self.norms
