"""The report's interventions figure: what the probes score with fewer registers, or with registers replaced.

Drawn from the folders ``regablate probe RUN --test_registers K`` and ``--register_intervention KIND``
write beside each run (a grid's ``over`` stages, e.g. ``configs/fig8/interventions.yaml``), read by
their summary keys (``test_registers``, ``register_intervention``, ``intervention_from_block``). One
column per probe metric: on top, the metric against K (registers kept at test time) with one line
per trained R; below, one bar per intervention in a group per trained R, beside the untouched
model's own probe (``none``). Each value is the mean over seeds, with their std as error bars.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a window

from matplotlib.figure import Figure

from regablate.report.tables import group_axes, mean_std, series_label

FIGURE_FILE = "interventions.png"
# The probe metrics a column is drawn for (when a result has them): key, title, whether higher is better.
METRICS = (
    ("probe/cls_top1", "classification top-1", True),
    ("probe/seg_miou", "segmentation mIoU", True),
    ("probe/depth_rmse", "depth RMSE", False),
    ("probe/lost_corloc", "LOST CorLoc", True),
)
PLAIN = "none"  # the bar of the untouched model (the run's own probe)
KIND_ORDER = (PLAIN, "zero", "mean", "noise", "shuffle")

Values = dict[str, list[float]]  # metric -> the values of its seeds


@dataclass
class InterventionResults:
    """The intervened results of a grid, grouped: ``kept`` (trained R -> K -> values), ``replaced``
    (trained R -> intervention -> values, the untouched model as ``none``); R is ``R=4`` or, where
    the grid has several series, ``<series>, R=4``."""

    kept: dict[str, dict[int, Values]] = field(default_factory=dict)
    replaced: dict[str, dict[str, Values]] = field(default_factory=dict)

    @property
    def metrics(self) -> list[tuple[str, str, bool]]:
        """The metrics the intervened probes have (not those of the untouched model alone)."""
        cells = [
            *(values for group in self.kept.values() for values in group.values()),
            *(values for group in self.replaced.values() for label, values in group.items() if label != PLAIN),
        ]
        present = {key for values in cells for key in values}
        return [metric for metric in METRICS if metric[0] in present]


def intervention_results(rows: list[dict[str, Any]]) -> InterventionResults | None:
    """The intervened results among ``rows`` (complete probes with a register count), or None when there are none."""
    axes = group_axes(rows)
    complete = [row for row in rows if row.get("status") == "complete" and row.get("num_registers") is not None]
    tampered = [row for row in complete if _is_intervened(row)]
    if not tampered:
        return None
    series = {series_label(row, axes) for row in tampered}

    def trained(row: dict[str, Any]) -> str:
        label = f"R={int(row['num_registers'])}"
        return label if len(series) == 1 else f"{series_label(row, axes)}, {label}"

    kept: dict[str, dict[int, Values]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    replaced: dict[str, dict[str, Values]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for row in tampered:
        kind = row.get("register_intervention")
        k = row.get("test_registers")
        if kind in (None, PLAIN):
            _add(kept[trained(row)][int(row["test_registers"])], row)
            continue
        start = row.get("intervention_from_block") or 0
        label = str(kind) + (f" from block {start}" if start else "") + ("" if k is None else f", K={k}")
        _add(replaced[trained(row)][label], row)
    for row in complete:  # the untouched model beside the bars of its R
        plain = not _is_intervened(row) and not row.get("test_time_registers")
        if plain and series_label(row, axes) in series and trained(row) in replaced:
            _add(replaced[trained(row)][PLAIN], row)
    return InterventionResults(kept, replaced)


def _is_intervened(row: dict[str, Any]) -> bool:
    return row.get("test_registers") is not None or row.get("register_intervention") not in (None, PLAIN)


def _add(values: Values, row: dict[str, Any]) -> None:
    for key, _, _ in METRICS:
        value = row.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            values[key].append(float(value))


def _registers(label: str) -> int:
    return int(label.rsplit("R=", 1)[1])


def _kind_order(label: str) -> tuple[int, str]:
    kind = label.split(" ", 1)[0].rstrip(",")
    return (KIND_ORDER.index(kind) if kind in KIND_ORDER else len(KIND_ORDER), label)


def draw_interventions(path: Path, title: str, results: InterventionResults) -> Figure:
    """Save (and return) the figure: per probe metric, the metric against K per trained R, a bar per intervention."""
    metrics = results.metrics
    rows = [part for part, present in (("kept", results.kept), ("replaced", results.replaced)) if present]
    figure = Figure(figsize=(3.4 * max(len(metrics), 1) + 0.6, 2.9 * len(rows) + 0.5), layout="constrained")
    figure.suptitle(f"{title}: probes with K of the trained R registers kept, and with the registers replaced")
    axes = figure.subplots(len(rows), max(len(metrics), 1), squeeze=False)
    for column, (key, label, higher) in enumerate(metrics):
        better = f"{'higher' if higher else 'lower'} is better"
        for row, part in enumerate(rows):
            ax = axes[row][column]
            if part == "kept":
                _draw_kept(ax, results.kept, key)
                ax.set_title(f"{label} against K ({better})", fontsize=9)
            else:
                _draw_replaced(ax, results.replaced, key)
                ax.set_title(f"{label}, registers replaced ({better})", fontsize=9)
            ax.grid(alpha=0.3, axis="y" if part == "replaced" else "both")
            ax.tick_params(labelsize=8)
    figure.savefig(path, dpi=90)
    return figure


def _draw_kept(ax: Any, kept: dict[str, dict[int, Values]], key: str) -> None:
    ks: set[int] = set()
    for trained, by_k in sorted(kept.items(), key=lambda item: (_registers(item[0]), item[0])):
        points = sorted((k, mean_std(values[key])) for k, values in by_k.items() if values.get(key))
        if points:
            ax.errorbar(
                [k for k, _ in points],
                [mean for _, (mean, _) in points],
                yerr=[std for _, (_, std) in points],
                marker="o",
                capsize=3,
                label=f"trained {trained}",
            )
            ks |= {k for k, _ in points}
    ax.set_xticks(sorted(ks))
    ax.set_xlabel("registers kept at test time (K)", fontsize=8)
    if ks:
        ax.legend(fontsize=7)


def _draw_replaced(ax: Any, replaced: dict[str, dict[str, Values]], key: str) -> None:
    groups = sorted(replaced, key=lambda trained: (_registers(trained), trained))
    labels = sorted({label for group in replaced.values() for label in group}, key=_kind_order)
    width = 0.8 / len(labels)
    for index, label in enumerate(labels):
        cells = [
            (position, mean_std(replaced[trained][label][key]))
            for position, trained in enumerate(groups)
            if replaced[trained].get(label, {}).get(key)
        ]
        if cells:
            ax.bar(
                [position - 0.4 + width * (index + 0.5) for position, _ in cells],
                [mean for _, (mean, _) in cells],
                width,
                yerr=[std for _, (_, std) in cells],
                capsize=2,
                label=label,
                color=f"C{index}",
            )
    ax.set_xticks(range(len(groups)), [f"trained {trained}" for trained in groups])
    ax.legend(fontsize=7)
