"""``OutlierNormMonitor``: high-norm (artifact) tokens of every block, watched while a model trains."""

from __future__ import annotations

from collections.abc import Sequence

from lightning import LightningModule, Trainer

from regablate.artifact_images import position_grid
from regablate.artifact_scan import scan
from regablate.artifacts import Threshold, block_key, summary_keys
from regablate.callbacks.fixed_images import FixedImagesCallback, tensorboards
from regablate.summary import update_summary


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
      ``artifacts/cls_register_attention``;
    * TensorBoard only: histograms ``artifacts/patch_norms/block_NN`` and the image
      ``artifacts/outlier_positions`` (how often each patch position is an outlier, a tile per block).

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
    """

    def __init__(
        self,
        every_n_steps: int | None = 100,
        num_images: int = 16,
        threshold: str = "relative",
        threshold_value: float | None = None,
        blocks: Sequence[int] | None = None,
        histograms: bool = True,
    ) -> None:
        super().__init__(num_images, every_n_steps)
        self.threshold = Threshold(threshold, threshold_value)
        self.blocks = None if blocks is None else list(blocks)
        self.histograms = histograms
        self.latest: dict[str, float] = {}

    def measure(self, trainer: Trainer, pl_module: LightningModule, step: int) -> None:
        images, segmentation = self.images(pl_module)
        result = scan(pl_module.backbone, images, threshold=self.threshold, blocks=self.blocks, segmentation=segmentation)
        self.latest = {**result.stats, "artifacts/step": float(step)}
        for logger in trainer.loggers:
            logger.log_metrics(result.stats, step=step)
        if not self.histograms:
            return
        for writer in tensorboards(trainer):
            for block, norms in result.patch_norms.items():
                writer.add_histogram(block_key("patch_norms", block), norms, step)
            writer.add_image("artifacts/outlier_positions", position_grid(result.outlier_positions), step)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._maybe_measure(trainer, pl_module)
        if trainer.fast_dev_run:
            return
        log_dir = trainer.log_dir  # a collective call under DDP: every rank must make it
        if self.latest and trainer.is_global_zero and log_dir is not None:
            update_summary(log_dir, summary_keys(self.latest))
