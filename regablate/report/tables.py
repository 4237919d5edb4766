"""The report's tables: one row per run folder, results.csv, results.md (mean ± std over seeds) and the HPARAMS view."""

from __future__ import annotations

import csv
import io
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from regablate.errors import RegablateError
from regablate.report.paper import (
    METRIC_PREFIXES,
    PANELS,
    RESERVED_FOLDERS,
    SEED_AXIS,
    SERIES_AXIS,
    TABLE_EXTRA,
    TRAINED_SERIES,
    TTR_SERIES,
    val_scored_panels,
)
from regablate.runs import RunRecord, intervention_label, write_folder_atomic


def collect_rows(experiment: Path) -> list[dict[str, Any]]:
    """One row per run folder with a summary: ``run`` and every key but the (multi-line) log tails; a probe
    scored on val (no test split) fills its panel's key (:func:`~regablate.report.paper.val_scored_panels`).

    A run whose summary cannot be read is left out, with one line on stderr saying which and why.
    """
    if not experiment.is_dir():
        raise RegablateError(f"experiment folder not found: {experiment} (give runs/<grid name>)")
    rows = []
    for run_dir in sorted(p for p in experiment.iterdir() if p.is_dir() and p.name not in RESERVED_FOLDERS):
        record = RunRecord(run_dir)
        if not record.exists():
            continue
        try:
            summary = record.read()
        except RegablateError as err:
            print(f"report: skipped run {run_dir.name}: {err}", file=sys.stderr, flush=True)
            continue
        row = {"run": run_dir.name, **{k: v for k, v in summary.items() if not k.endswith("/log_tail")}}
        rows.append({**row, **val_scored_panels(row)})
    if not rows:
        raise RegablateError(f"{experiment} holds no run folder with a readable summary.json: has the sweep run?")
    return rows


def results_csv(rows: list[dict[str, Any]]) -> str:
    first = ["run", "num_registers", "seed", "status"]
    others = sorted({key for row in rows for key in row} - set(first))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=[*first, *others], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def group_axes(rows: list[dict[str, Any]]) -> list[str]:
    """Axes other than the seed: each of their values is its own series (the register count is no ``axis/`` key)."""
    return sorted({k for row in rows for k in row if k.startswith("axis/")} - {SEED_AXIS})


def series_label(row: dict[str, Any], axes: list[str]) -> str:
    """``series=continued`` reads ``continued`` (a grid's further series); runs without an axis leave it out."""
    parts = [
        str(row[axis]) if axis == SERIES_AXIS else f"{axis.rsplit('.', 1)[-1]}={row[axis]}"
        for axis in axes
        if row.get(axis) is not None
    ]
    return ", ".join(parts) or TRAINED_SERIES


def aggregate(rows: list[dict[str, Any]]) -> dict[str, dict[int, dict[str, list[float]]]]:
    """series label -> register count -> metric -> the values of its seeds (runs whose fit completed)."""
    axes = group_axes(rows)
    table: dict[str, dict[int, dict[str, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for row in rows:
        registers = row.get("num_registers")
        if registers is None or row.get("status") != "complete":
            continue
        label = series_label(row, axes)
        if row.get("test_time_registers"):  # a `probe --test_time_registers` folder beside its run
            label = TTR_SERIES if label == TRAINED_SERIES else f"{label}, {TTR_SERIES}"
        tampered = intervention_label(row)  # a `probe --register_intervention/--test_registers` folder
        if tampered:
            label = tampered if label == TRAINED_SERIES else f"{label}, {tampered}"
        for key, value in row.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                table[label][int(registers)][key].append(float(value))
    return table


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def results_markdown(name: str, rows: list[dict[str, Any]]) -> str:
    table = aggregate(rows)
    present = {key for series in table.values() for cell in series.values() for key in cell}
    columns = [(key, higher) for key, _, higher in PANELS if key in present]
    columns += [(key, higher) for key, higher in TABLE_EXTRA if key in present]
    cells = [(label, registers, cell) for label, series in table.items() for registers, cell in sorted(series.items())]
    best: dict[str, float | None] = {}
    for key, higher in columns:
        means = [statistics.fmean(cell[key]) for _, _, cell in cells if cell.get(key)]
        best[key] = (max if higher else min)(means) if means else None
    failed = sorted(row["run"] for row in rows if any(v == "failed" for k, v in row.items() if k.startswith("stages/")))
    lines = [
        f"# {name}: the register-count grid",
        "",
        f"{len(rows)} runs ({len(failed)} failed); each cell is the mean ± std over seeds (n = seeds); "
        "the best mean of a column is **bold**.",
        "",
        "| series | registers | n | " + " | ".join(key for key, _ in columns) + " |",
        "|---|---:|---:|" + "---:|" * len(columns),
    ]
    for label, registers, cell in cells:
        seeds = max((len(values) for key, values in cell.items() if key in dict(columns)), default=0)
        values = []
        for key, _ in columns:
            if not cell.get(key):
                values.append("")
                continue
            mean, std = mean_std(cell[key])
            text = f"{mean:.4f} ± {std:.4f}"
            top = best[key]
            values.append(f"**{text}**" if top is not None and math.isclose(mean, top) else text)
        lines.append(f"| {label} | {registers} | {seeds} | " + " | ".join(values) + " |")
    if failed:
        lines += ["", f"Failed runs (see their sweep.log): {', '.join(failed)}"]
    return "\n".join(lines) + "\n"


def write_hparams(folder: Path, rows: list[dict[str, Any]]) -> None:
    """``hparams/<run>/``: one ``add_hparams`` record per run (the folder is replaced whole)."""
    from torch.utils.tensorboard import SummaryWriter

    def write(staging: Path) -> None:
        for row in rows:
            params = {
                "num_registers": row.get("num_registers"),
                "seed": row.get("seed"),
                "model_name": row.get("model_name"),
                "task": row.get("task"),
            }
            params.update({key.removeprefix("axis/"): value for key, value in row.items() if key.startswith("axis/")})
            params = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in params.items()}
            metrics = {
                key: float(value)
                for key, value in row.items()
                if key.startswith(METRIC_PREFIXES) and isinstance(value, (int, float)) and not isinstance(value, bool)
            }
            writer = SummaryWriter(str(staging / row["run"]))
            try:
                writer.add_hparams(params, metrics, run_name=".")
            finally:
                writer.close()

    write_folder_atomic(folder, write)
