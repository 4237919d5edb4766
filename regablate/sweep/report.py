"""``regablate report runs/<experiment>``: a grid's results as a table, a Figure 8 and a TensorBoard HPARAMS view.

    regablate report runs/fig8_cpu                    # any grid, complete or partial
    regablate report runs/fig8_paper --paper          # overlay the paper's Figure 8 numbers

Writes into the experiment folder (each file atomically):

* ``results.csv``: one row per run folder holding a ``summary.json``, every summary key;
* ``results.md``: mean ± std over seeds per register count (and per value of any other axis),
  the best mean of each column in bold;
* ``figure8.png``: top, the last block's CLS attention on the same images for each register
  count (from each count's lowest-seed run, via ``artifact_scan.scan``); bottom, classification
  top-1, segmentation mIoU, depth RMSE and outlier fraction against the register count, with
  error bars over seeds;
* ``hparams/<run>/``: each run's hyper-parameters with its final metrics for TensorBoard's HPARAMS tab.
"""

from __future__ import annotations

import csv
import io
import math
import os
import statistics
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from jsonargparse import ArgumentParser

from regablate.errors import RegablateError
from regablate.summary import SUMMARY_FILE, read_summary, write_text_atomic

if TYPE_CHECKING:
    from regablate.sweep.grid import Grid

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
TABLE_EXTRA = (("probe/lost_corloc", True), ("val/top1", True), ("test/top1", True), ("artifacts/norm_max_over_median", False))
# Summary-key prefixes that are final metrics (for the HPARAMS view).
METRIC_PREFIXES = ("probe/", "artifacts/", "val/", "test/", "train/")
RESERVED_FOLDERS = ("hparams", "slurm")
# The series of results probed with a test-time register (`regablate probe RUN --test_time_registers auto`).
TRAINED_SERIES, TTR_SERIES = "trained registers", "+ test-time register"
# Axes that are the figure's x axis and its error bars, not series of their own.
SEED_AXIS, REGISTER_AXIS = "axis/seed_everything", "axis/model.init_args.num_registers"


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="regablate report", description="results.csv, results.md, figure8.png and a TensorBoard HPARAMS view of a grid.", exit_on_error=False)
    parser.add_argument("experiment", type=str, help="the grid's folder, e.g. runs/fig8_cpu")
    parser.add_argument("--images", type=Optional[str], default=None, help="image folder for the attention maps (default: fixed synthetic scenes)")
    parser.add_argument("--num_images", type=int, default=2, help="images in the attention-map rows")
    parser.add_argument("--paper", action="store_true", help="overlay the paper's Figure 8 values")
    return parser


def main(argv: list[str]) -> None:
    """Entry point of ``regablate report``."""
    args = build_parser().parse_args(argv)
    paths = write_report(Path(args.experiment), images=args.images, num_images=args.num_images, paper=args.paper)
    print(f"wrote {', '.join(str(p) for p in paths)}")


def write_report(
    experiment: Path, *, grid: Grid | None = None, images: str | None = None, num_images: int | None = None, paper: bool | None = None
) -> list[Path]:
    """Write every report file of ``experiment``; a grid's ``report:`` settings fill what is not given."""
    settings = grid.report if grid is not None else {}
    if images is None and settings.get("images"):
        images = str((grid.path.parent / settings["images"]).resolve())
    num_images = num_images or settings.get("num_images", 2)
    paper = paper if paper is not None else settings.get("paper", False)
    rows = collect_rows(experiment)
    written = [
        experiment / "results.csv",
        experiment / "results.md",
        experiment / "figure8.png",
        experiment / "hparams",
    ]
    write_text_atomic(written[0], results_csv(rows))
    write_text_atomic(written[1], results_markdown(experiment.name, rows))
    from regablate.sweep.figure import attention_rows, draw_figure8

    maps = attention_rows(experiment, rows, images, num_images)
    _save_atomic(written[2], lambda path: draw_figure8(path, experiment.name, aggregate(rows), maps, paper))
    write_hparams(written[3], rows)
    return written


def collect_rows(experiment: Path) -> list[dict[str, Any]]:
    """One row per run folder with a summary: ``run`` and every key but the (multi-line) log tails."""
    if not experiment.is_dir():
        raise RegablateError(f"experiment folder not found: {experiment} (give runs/<grid name>)")
    rows = []
    for run_dir in sorted(p for p in experiment.iterdir() if p.is_dir() and p.name not in RESERVED_FOLDERS):
        if not (run_dir / SUMMARY_FILE).is_file():
            continue
        summary = read_summary(run_dir)
        rows.append({"run": run_dir.name, **{k: v for k, v in summary.items() if not k.endswith("/log_tail")}})
    if not rows:
        raise RegablateError(f"{experiment} holds no run folder with a summary.json: has the sweep run?")
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
    """Axes other than registers and seed: each of their values is its own series."""
    return sorted({k for row in rows for k in row if k.startswith("axis/")} - {SEED_AXIS, REGISTER_AXIS})


def aggregate(rows: list[dict[str, Any]]) -> dict[str, dict[int, dict[str, list[float]]]]:
    """series label -> register count -> metric -> the values of its seeds (runs whose fit completed)."""
    axes = group_axes(rows)
    table: dict[str, dict[int, dict[str, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for row in rows:
        registers = row.get("num_registers")
        if registers is None or row.get("status") != "complete":
            continue
        label = ", ".join(f"{axis.rsplit('.', 1)[-1]}={row.get(axis)}" for axis in axes) or TRAINED_SERIES
        if row.get("test_time_registers"):  # a `probe --test_time_registers` folder beside its run
            label = TTR_SERIES if label == TRAINED_SERIES else f"{label}, {TTR_SERIES}"
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
    best = {}
    for key, higher in columns:
        means = [statistics.fmean(cell[key]) for _, _, cell in cells if cell.get(key)]
        best[key] = (max if higher else min)(means) if means else None
    failed = sorted(row["run"] for row in rows if any(v == "failed" for k, v in row.items() if k.startswith("stages/")))
    lines = [
        f"# {name}: the register-count grid",
        "",
        f"{len(rows)} runs ({len(failed)} failed); each cell is the mean ± std over seeds (n = seeds); the best mean of a column is **bold**.",
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
            values.append(f"**{text}**" if best[key] is not None and math.isclose(mean, best[key]) else text)
        lines.append(f"| {label} | {registers} | {seeds} | " + " | ".join(values) + " |")
    if failed:
        lines += ["", f"Failed runs (see their sweep.log): {', '.join(failed)}"]
    return "\n".join(lines) + "\n"


def write_hparams(folder: Path, rows: list[dict[str, Any]]) -> None:
    """``hparams/<run>/``: one ``add_hparams`` record per run (the folder is replaced whole)."""
    from torch.utils.tensorboard import SummaryWriter

    from regablate.inspect import write_atomically

    def write(staging: Path) -> None:
        for row in rows:
            params = {"num_registers": row.get("num_registers"), "seed": row.get("seed"), "model_name": row.get("model_name"), "task": row.get("task")}
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

    write_atomically(folder, write)


def _save_atomic(path: Path, save: Any) -> None:
    """Call ``save(temp_path)`` and rename the file into ``path`` (readable by all, as a plain save would be)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    try:
        save(Path(tmp))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
