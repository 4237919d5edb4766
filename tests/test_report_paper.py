"""`regablate report --paper true`: only the paper's values measured like the grid's are drawn, each with its source."""

from __future__ import annotations

import json

import pytest

from regablate.cli import main
from regablate.report.figure import draw_figure8
from regablate.report.paper import AVERAGED, PAPER_VALUES, paper_dataset, paper_overlays
from regablate.report.tables import aggregate, collect_rows


@pytest.mark.parametrize(
    "name, dataset",
    [
        ("ILSVRC/imagenet-1k", "imagenet-1k"),
        ("/data/imagenet", "imagenet-1k"),
        ("scene_parse_150", "ade20k"),
        ("/data/ADEChallengeData2016/", "ade20k"),
        ("sayakpaul/nyu_depth_v2", "nyud"),
        ("/mnt/nyud:labeled", "nyud"),
        ("SyntheticScenes", None),
        ("/data/imagenet-r", None),  # another dataset that only shares a prefix
        (None, None),
    ],
)
def test_probe_data_names_map_to_the_papers_datasets(name, dataset):
    assert paper_dataset(name) == dataset


def grid_rows(protocol="dinov2", cls_data="ILSVRC/imagenet-1k", seg_data="scene_parse_150", depth_data="nyu_depth_v2"):
    rows = []
    for registers in (0, 4):
        for seed in (0, 1):
            rows.append(
                {
                    "run": f"r{registers}_s{seed}",
                    "num_registers": registers,
                    "seed": seed,
                    "status": "complete",
                    "probe/protocol": protocol,
                    "probe/cls_top1": 0.80 + 0.01 * registers,
                    "probe/cls_dataset": cls_data,
                    "probe/seg_miou": 0.40,
                    "probe/seg_dataset": seg_data,
                    "probe/depth_rmse": 0.45,
                    "probe/depth_dataset": depth_data,
                }
            )
    return rows


def test_single_dataset_grids_get_table_2a_and_only_imagenet_gets_figure_8():
    overlays = paper_overlays(grid_rows())
    assert [(v.source, v.dataset) for v in overlays["probe/cls_top1"].values] == [
        ("Figure 8", "imagenet-1k"),
        ("Table 2a", "imagenet-1k"),
    ]
    # Figure 8's dense panels average several datasets: never drawn beside ADE20k or NYUd alone.
    assert [(v.source, v.dataset) for v in overlays["probe/seg_miou"].values] == [("Table 2a", "ade20k")]
    assert [(v.source, v.dataset) for v in overlays["probe/depth_rmse"].values] == [("Table 2a", "nyud")]
    assert {v.dataset for v in PAPER_VALUES if v.source == "Figure 8" and v.metric != "probe/cls_top1"} == {AVERAGED}
    table_2a = {v.metric: v.points() for v in PAPER_VALUES if v.source == "Table 2a"}
    assert table_2a["probe/seg_miou"] == pytest.approx({0: 0.466, 4: 0.479})  # the summary's units (fractions)
    assert table_2a["probe/cls_top1"] == pytest.approx({0: 0.843, 4: 0.848})
    assert table_2a["probe/depth_rmse"] == pytest.approx({0: 0.378, 4: 0.366})


def test_other_data_or_the_fast_protocol_get_no_paper_values_and_say_why():
    synthetic = paper_overlays(grid_rows(cls_data="SyntheticScenes", seg_data="SyntheticScenes"))
    assert synthetic["probe/cls_top1"].values == () and "SyntheticScenes" in synthetic["probe/cls_top1"].reason
    assert [v.source for v in synthetic["probe/depth_rmse"].values] == ["Table 2a"]
    fast = paper_overlays(grid_rows(protocol="fast"))
    assert all(not overlay.values and "dinov2" in overlay.reason for overlay in fast.values())
    mixed = grid_rows()
    mixed[0]["probe/seg_dataset"] = "/data/voc2012"
    assert paper_overlays(mixed)["probe/seg_miou"].values == ()


def test_the_figure_labels_each_overlay_with_its_source(tmp_path):
    rows = grid_rows(seg_data="SyntheticScenes")
    figure = draw_figure8(
        tmp_path / "f.png", "grid", aggregate(rows), {"images": None, "maps": {}}, paper_overlays(rows)
    )
    cls_panel, seg_panel, depth_panel, _ = figure.axes
    labels = {text.get_text() for text in cls_panel.get_legend().get_texts()}
    assert labels == {"this grid", "paper, Figure 8 (ViT-L/14, imagenet-1k)", "paper, Table 2a (ViT-L/14, imagenet-1k)"}
    table_2a = next(line for line in depth_panel.get_lines() if "Table 2a" in line.get_label())
    assert list(table_2a.get_ydata()) == pytest.approx([0.378, 0.366])  # on the grid's own axis and units
    assert seg_panel.get_legend() is None
    assert any("no paper values for SyntheticScenes" in text.get_text() for text in seg_panel.texts)


def test_report_command_prints_what_it_overlaid(tmp_path, capsys):
    experiment = tmp_path / "grid"
    for row in grid_rows(depth_data="SyntheticScenes"):
        folder = experiment / row["run"]
        folder.mkdir(parents=True)
        (folder / "summary.json").write_text(json.dumps({k: v for k, v in row.items() if k != "run"}))
    main(["report", str(experiment), "--paper", "true"])
    out = capsys.readouterr().out
    assert "paper values on probe/seg_miou: paper, Table 2a (ViT-L/14, ade20k)" in out
    assert "paper values on probe/depth_rmse: none (no paper values for SyntheticScenes)" in out
    assert (experiment / "figure8.png").is_file()


def test_a_probe_scored_on_val_fills_its_panel(tmp_path):
    """ADE20k has no test split (paper.yaml: test_split null): its val mIoU is the panel's, as the paper's is."""
    run = tmp_path / "r4_s0"
    run.mkdir()
    summary = {"status": "complete", "num_registers": 4, "probe/seg_val_miou": 0.47, "probe/cls_top1": 0.8}
    (run / "summary.json").write_text(json.dumps({**summary, "probe/cls_val_top1": 0.9}))
    (row,) = collect_rows(tmp_path)
    assert row["probe/seg_miou"] == 0.47 and row["probe/cls_top1"] == 0.8  # a test score is never replaced
    assert "probe/depth_rmse" not in row
