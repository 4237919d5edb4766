"""``regablate report runs/<experiment>``: a grid's results as a table, a Figure 8 and a TensorBoard HPARAMS view.

    regablate report runs/fig8_cpu                    # any grid, complete or partial
    regablate report runs/fig8_paper --paper true     # overlay the paper's numbers that match the grid's data

Writes into the experiment folder (each file atomically):

* ``results.csv``: one row per run folder holding a ``summary.json``, every summary key;
* ``results.md``: mean ± std over seeds per register count (and per value of any other axis),
  the best mean of each column in bold; then the token-probe table of each run that has one
  (``regablate.artifacts.token_probes``);
* ``figure8.png``: top, the last block's CLS attention on the same images for each register
  count (from each count's lowest-seed run, via ``regablate.artifacts.scan``); bottom, classification
  top-1, segmentation mIoU, depth RMSE and outlier fraction against the register count, with
  error bars over seeds; with ``--paper true``, the paper's values that were measured on the same
  dataset with the same protocol (Figure 8's ImageNet curve, Table 2a's single-dataset points; see
  ``regablate.report.paper``), each labelled with its source;
* ``interventions.png``, only where runs were probed with fewer registers or with their registers
  replaced (``regablate probe --test_registers / --register_intervention``): per probe metric, the
  metric against K per trained R and a bar per intervention (``regablate.report.interventions``);
* ``hparams/<run>/``: each run's hyper-parameters with its final metrics for TensorBoard's HPARAMS tab.
"""

from __future__ import annotations

from pathlib import Path

from jsonargparse import ArgumentParser, Namespace
from jsonargparse.typing import PositiveInt

from regablate.artifacts.token_tables import report_section as token_report_section
from regablate.commands import Renamed, function_arguments, modernise, tool_parser
from regablate.report.paper import paper_overlays
from regablate.report.settings import Report
from regablate.report.tables import aggregate, collect_rows, results_csv, results_markdown, write_hparams
from regablate.runs import atomic_path, intervention_label, write_text_atomic

RENAMED = (Renamed("--paper", "--paper", "true"),)


def report(experiment: str, images: str | None = None, num_images: PositiveInt = 2, paper: bool = False) -> list[Path]:
    """results.csv, results.md, figure8.png and a TensorBoard HPARAMS view of a grid's folder.

    Args:
        experiment: the grid's folder, e.g. runs/fig8_cpu.
        images: image folder for the attention maps (default: fixed synthetic scenes).
        num_images: images in the attention-map rows.
        paper: overlay the paper's values measured like the grid's (same dataset, dinov2 protocol), with their source.
    """
    paths = write_report(Path(experiment), Report(images=images, num_images=num_images, paper=paper))
    print(f"wrote {', '.join(str(p) for p in paths)}")
    return paths


def build_parser() -> ArgumentParser:
    parser = tool_parser("report", "results.csv, results.md, figure8.png and a TensorBoard HPARAMS view of a grid.")
    parser.add_function_arguments(report, as_positional=True)
    return parser


def parse(argv: list[str]) -> Namespace:
    """``regablate report``'s command line, parsed (errors surface as ArgumentError)."""
    return build_parser().parse_args(modernise(argv, "report", RENAMED))


def main(argv: list[str]) -> None:
    """Entry point of ``regablate report``."""
    report(**function_arguments(parse(argv)))


def write_report(experiment: Path, settings: Report) -> list[Path]:
    """Write every report file of ``experiment`` as ``settings`` say (``enabled`` is the caller's to check)."""
    rows = collect_rows(experiment)
    from regablate.report.figure import attention_rows, draw_figure8  # torch and matplotlib, once there are runs
    from regablate.report.interventions import FIGURE_FILE, draw_interventions, intervention_results

    written = [
        experiment / "results.csv",
        experiment / "results.md",
        experiment / "figure8.png",
        experiment / "hparams",
    ]
    write_text_atomic(written[0], results_csv(rows))
    token_tables = token_report_section(experiment, [row["run"] for row in rows])
    write_text_atomic(written[1], results_markdown(experiment.name, rows) + token_tables)
    maps = attention_rows(experiment, rows, settings.images, settings.num_images)
    overlays = paper_overlays(rows) if settings.paper else None
    trained = aggregate([row for row in rows if not intervention_label(row)])  # the intervened: interventions.png
    with atomic_path(written[2]) as tmp:
        draw_figure8(tmp, experiment.name, trained, maps, overlays)
    intervened = intervention_results(rows)
    if intervened is not None:
        written.append(experiment / FIGURE_FILE)
        with atomic_path(written[-1]) as tmp:
            draw_interventions(tmp, experiment.name, intervened)
    for metric, overlay in (overlays or {}).items():
        sources = ", ".join(values.label for values in overlay.values)
        print(f"paper values on {metric}: {sources or 'none (' + overlay.reason + ')'}")
    write_hparams(written[3], rows)
    return written
