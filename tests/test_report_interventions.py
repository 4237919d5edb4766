"""`regablate report`'s interventions figure, from run folders with fabricated summaries."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from regablate.cli import main
from regablate.report.interventions import FIGURE_FILE, draw_interventions, intervention_results
from regablate.report.tables import collect_rows

KINDS = ("zero", "mean", "noise", "shuffle")


def summary(registers: int, seed: int, top1: float, **keys: object) -> dict:
    return {"status": "complete", "num_registers": registers, "seed": seed, "probe/cls_top1": top1, **keys}


def write_runs(experiment: Path, intervened: bool) -> None:
    """Trained runs r0 and r2 over two seeds; with ``intervened``, their K = 0..R and intervention folders too."""
    folders = {}
    for seed in (0, 1):
        for registers in (0, 2):
            run = f"r{registers}_s{seed}"
            folders[run] = summary(registers, seed, 0.5 + 0.1 * registers + 0.01 * seed, **{"probe/seg_miou": 0.3})
            folders[f"{run}_ttr"] = summary(registers, seed, 0.9, test_time_registers=1)
            if not intervened:
                continue
            for k in range(registers + 1):
                folders[f"{run}_k{k}"] = summary(registers, seed, 0.5 + 0.1 * k + 0.01 * seed, test_registers=k)
            for index, kind in enumerate(KINDS if registers else ()):
                keys = {"register_intervention": kind, "intervention_from_block": 0}
                folders[f"{run}_{kind}"] = summary(registers, seed, 0.2 + 0.1 * index, **keys)
    for name, keys in folders.items():
        (experiment / name).mkdir(parents=True)
        (experiment / name / "summary.json").write_text(json.dumps(keys))


def test_the_figure_draws_a_line_per_trained_r_against_k_and_a_bar_per_intervention(tmp_path):
    write_runs(tmp_path, intervened=True)
    results = intervention_results(collect_rows(tmp_path))
    assert results is not None
    assert results.kept["R=2"][1]["probe/cls_top1"] == pytest.approx([0.6, 0.61])
    assert sorted(results.kept) == ["R=0", "R=2"] and sorted(results.replaced) == ["R=2"]
    assert results.replaced["R=2"]["none"]["probe/cls_top1"] == pytest.approx([0.7, 0.71])  # the run's own probe
    assert [metric for metric, _, _ in results.metrics] == ["probe/cls_top1"]  # only what the intervened runs have
    figure = draw_interventions(tmp_path / "f.png", "grid", results)
    against_k, bars = figure.axes
    curves = {container.get_label(): container.lines[0] for container in against_k.containers}
    assert list(curves) == ["trained R=0", "trained R=2"]
    assert list(curves["trained R=0"].get_xdata()) == [0]
    assert list(curves["trained R=2"].get_xdata()) == [0, 1, 2]
    assert list(curves["trained R=2"].get_ydata()) == pytest.approx([0.505, 0.605, 0.705])  # mean over seeds
    assert [text.get_text() for text in bars.get_legend().get_texts()] == ["none", *KINDS]
    assert [round(patch.get_height(), 3) for patch in bars.patches] == [0.705, 0.2, 0.3, 0.4, 0.5]
    assert [label.get_text() for label in bars.get_xticklabels()] == ["trained R=2"]


def test_a_grid_with_further_series_names_the_series_of_each_trained_r():
    rows = [
        {**summary(2, 0, 0.5, test_registers=1), "run": "a", "axis/series": "continued"},
        {**summary(2, 0, 0.6, test_registers=1), "run": "b"},
    ]
    results = intervention_results(rows)
    assert results is not None and sorted(results.kept) == ["continued, R=2", "trained registers, R=2"]


def test_report_writes_the_figure_only_where_runs_were_probed_so(tmp_path, capsys):
    with_results, without = tmp_path / "with", tmp_path / "without"
    write_runs(with_results, intervened=True)
    write_runs(without, intervened=False)
    main(["report", str(with_results)])
    assert FIGURE_FILE in capsys.readouterr().out
    assert (with_results / FIGURE_FILE).stat().st_size > 10_000
    table = (with_results / "results.md").read_text()  # the table keeps every row; figure8 only the trained
    assert "| K=1 test registers | 2 | 2 |" in table and "| registers zero | 2 | 2 |" in table
    main(["report", str(without)])
    assert FIGURE_FILE not in capsys.readouterr().out
    assert not (without / FIGURE_FILE).exists() and (without / "figure8.png").is_file()
    assert intervention_results(collect_rows(without)) is None
