"""What the report compares against and how it lays the figure out: the paper's values, panels, series names."""

from __future__ import annotations

# Figure 8 of Darcet et al. (DINOv2 ViT-L/14), read off the figure: registers -> value.
PAPER = {
    "probe/cls_top1": dict(zip((0, 1, 2, 4, 8, 16), (84.35, 84.42, 84.60, 84.60, 84.64, 84.80))),
    "probe/seg_miou": dict(zip((0, 1, 2, 4, 8, 16), (66.02, 66.66, 66.69, 66.91, 66.76, 66.75))),
    "probe/depth_rmse": dict(zip((0, 1, 2, 4, 8, 16), (2.845, 2.750, 2.772, 2.753, 2.728, 2.761))),
}
# Figure 8's bottom row: metric, panel title, whether higher is better.
PANELS = (
    ("probe/cls_top1", "classification top-1", True),
    ("probe/seg_miou", "segmentation mIoU", True),
    ("probe/depth_rmse", "depth RMSE", False),
    ("artifacts/outlier_frac", "outlier fraction", False),
)
# Columns of results.md beyond the panels, when the runs have them.
TABLE_EXTRA = (
    ("probe/lost_corloc", True),
    ("val/top1", True),
    ("test/top1", True),
    ("artifacts/norm_max_over_median", False),
)
# Summary-key prefixes that are final metrics (for the HPARAMS view).
METRIC_PREFIXES = ("probe/", "artifacts/", "val/", "test/", "train/")
RESERVED_FOLDERS = ("hparams", "slurm")
# The series of results probed with a test-time register (`regablate probe RUN --test_time_registers auto`).
TRAINED_SERIES, TTR_SERIES = "trained registers", "+ test-time register"
# Axes that are the figure's x axis and its error bars, not series of their own.
SEED_AXIS, REGISTER_AXIS = "axis/seed_everything", "axis/model.init_args.num_registers"
SERIES_AXIS = "axis/series"  # the runs of a grid's further series (grid.series) carry their name
