"""What the report compares against and how it lays the figure out: the paper's values, panels, series names.

The paper's numbers are only comparable with a grid's where they were measured the same way:
on the same dataset, with DINOv2's protocols (``--probe.protocol dinov2``). Figure 8 of Darcet
et al. plots ImageNet linear top-1, and for segmentation and depth *averages over several
datasets* (its axes read ~66 mIoU and ~2.8 RMSE, where ADE20k linear alone is ~47 and NYUd alone
~0.37), so its dense curves match no single-dataset grid; Table 2a gives single-dataset values for
0 and 4 registers. Each probe records the data it ran on (``probe/<probe>_dataset``) and its
protocol (``probe/protocol``); :func:`paper_overlays` keeps the paper's values whose dataset is the
grid's, and the figure labels each with its source.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from regablate.runs import SEED_KEY

REGISTERS = (0, 1, 2, 4, 8, 16)
# The paper's datasets, and names their copies go by (hub ids, usual folder names), lowercase.
DATASET_NAMES = {
    "imagenet-1k": ("ilsvrc/imagenet-1k", "imagenet-1k", "imagenet1k", "imagenet", "ilsvrc2012", "ilsvrc"),
    "ade20k": ("scene_parse_150", "ade20k", "adechallengedata2016", "ade"),
    "nyud": ("sayakpaul/nyu_depth_v2", "nyu_depth_v2", "nyud", "nyud-v2", "nyu"),
}
AVERAGED = "several datasets (averaged)"  # Figure 8's dense panels


@dataclass(frozen=True)
class PaperValues:
    """The paper's values of one metric (DINOv2 ViT-L/14): register count -> value, in the paper's units.

    ``dataset`` is one of ``DATASET_NAMES`` or ``AVERAGED``; ``unit`` turns a value into the
    summary's units (top-1 and mIoU are fractions there, percentages in the paper).
    """

    metric: str
    source: str
    dataset: str
    values: dict[int, float]
    unit: float = 1.0

    @property
    def label(self) -> str:
        return f"paper, {self.source} (ViT-L/14, {self.dataset})"

    def points(self) -> dict[int, float]:
        """Register count -> value in the summary's units."""
        return {registers: value * self.unit for registers, value in self.values.items()}


PAPER_VALUES = (
    # Figure 8, read off the figure.
    PaperValues(
        "probe/cls_top1",
        "Figure 8",
        "imagenet-1k",
        dict(zip(REGISTERS, (84.35, 84.42, 84.60, 84.60, 84.64, 84.80))),
        0.01,
    ),
    PaperValues(
        "probe/seg_miou", "Figure 8", AVERAGED, dict(zip(REGISTERS, (66.02, 66.66, 66.69, 66.91, 66.76, 66.75))), 0.01
    ),
    PaperValues(
        "probe/depth_rmse", "Figure 8", AVERAGED, dict(zip(REGISTERS, (2.845, 2.750, 2.772, 2.753, 2.728, 2.761)))
    ),
    # Table 2a: DINOv2 ViT-L/14 without and with 4 registers, single datasets.
    PaperValues("probe/cls_top1", "Table 2a", "imagenet-1k", {0: 84.3, 4: 84.8}, 0.01),
    PaperValues("probe/seg_miou", "Table 2a", "ade20k", {0: 46.6, 4: 47.9}, 0.01),
    PaperValues("probe/depth_rmse", "Table 2a", "nyud", {0: 0.378, 4: 0.366}),
)
# The probe behind each panel metric (its summary records probe/<probe>_dataset).
PANEL_PROBES = {"probe/cls_top1": "cls", "probe/seg_miou": "seg", "probe/depth_rmse": "depth"}


def paper_dataset(name: Any) -> str | None:
    """The paper dataset a probe's data name stands for (a hub id, a path, or a name given with ``--dataset``)."""
    if not isinstance(name, str) or not name:
        return None
    lowered = name.lower().rstrip("/")
    pieces = {lowered, *lowered.replace(":", "/").split("/")}
    for dataset, names in DATASET_NAMES.items():
        if pieces & set(names):
            return dataset
    return None


@dataclass(frozen=True)
class Overlay:
    """What the report draws on one panel: the matching paper values, or why there are none."""

    values: tuple[PaperValues, ...]
    reason: str = ""


def paper_overlays(rows: Iterable[dict[str, Any]]) -> dict[str, Overlay]:
    """Panel metric -> the paper's values that match the grid's data and protocol (or the reason none do)."""
    rows = [row for row in rows if row.get("status") == "complete"]
    overlays = {}
    for metric, probe in PANEL_PROBES.items():
        measured = [row for row in rows if isinstance(row.get(metric), (int, float))]
        names = {row.get(f"probe/{probe}_dataset") for row in measured}
        datasets = {paper_dataset(name) for name in names}
        protocols = {row.get("probe/protocol", "fast") for row in measured}
        if not measured:
            overlays[metric] = Overlay((), "no results")
        elif len(datasets) != 1 or None in datasets:
            shown = ", ".join(sorted(str(name) for name in names))
            overlays[metric] = Overlay((), f"no paper values for {shown}")
        elif protocols != {"dinov2"}:
            overlays[metric] = Overlay((), "comparable with --probe.protocol dinov2 only")
        else:
            dataset = datasets.pop()
            overlays[metric] = Overlay(tuple(v for v in PAPER_VALUES if v.metric == metric and v.dataset == dataset))
    return overlays


# Figure 8's bottom row: metric, panel title, whether higher is better.
PANELS = (
    ("probe/cls_top1", "classification top-1", True),
    ("probe/seg_miou", "segmentation mIoU", True),
    ("probe/depth_rmse", "depth RMSE", False),
    ("artifacts/outlier_frac", "outlier fraction", False),
)


def val_scored_panels(summary: dict[str, Any]) -> dict[str, Any]:
    """Panel values of probes scored on val (data without a test split: ``probe/seg_val_miou`` for ADE20k,
    whose paper numbers are its validation split's too) under the panel's key, where the test key is absent."""
    found = {}
    for key, _, _ in PANELS:
        if key.startswith("probe/") and key not in summary:
            probe, _, metric = key.removeprefix("probe/").partition("_")
            val_key = f"probe/{probe}_val_{metric}"
            if val_key in summary:
                found[key] = summary[val_key]
    return found


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
# The axis of the figure's error bars, not a series of its own (the x axis, the register count, is `num_registers`).
SEED_AXIS = f"axis/{SEED_KEY}"
SERIES_AXIS = "axis/series"  # the runs of a grid's further series (grid.series) carry their name
