"""The run record: the one reader and writer of ``summary.json``, its run names, old run folders and broken files."""

from __future__ import annotations

import json

import pytest

from regablate.cli import main as regablate_main
from regablate.errors import RegablateError
from regablate.report.tables import collect_rows
from regablate.runs import REGISTER_KEY, SEED_KEY, RunRecord, run_name
from regablate.sweep.state import mark_running


def test_run_names():
    assert run_name({REGISTER_KEY: 4, SEED_KEY: 0}) == "r4_s0"
    assert run_name({SEED_KEY: 1}) == "s1"
    assert run_name({"method": "dino", "model.init_args.lr": 0.01, REGISTER_KEY: 2}, labels={"method"}) == (
        "dino_lr-0.01_r2"
    )
    assert run_name({"data.init_args.path": "a/b"}) == "path-a-b" and run_name({}) == "run"


def test_updates_merge_and_drop_keys(tmp_path):
    record = RunRecord(tmp_path / "run")
    assert not record.exists() and record.read() == {}
    record.update({"a": 1, "b/x": 2})
    assert record.update({"c": 3}, drop=["b/x"]) == {"a": 1, "c": 3}
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == {"a": 1, "c": 3}
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["summary.json"]  # no temporary file left


def test_the_register_count_has_one_key(tmp_path):
    mark_running(tmp_path, "fit", {REGISTER_KEY: 4, SEED_KEY: 0, "series": "continued"})
    summary = RunRecord(tmp_path).read()
    assert (
        summary["num_registers"] == 4 and summary["axis/seed_everything"] == 0 and summary["axis/series"] == "continued"
    )
    assert f"axis/{REGISTER_KEY}" not in json.loads((tmp_path / "summary.json").read_text())


def test_a_summary_of_an_older_regablate_reads_with_todays_keys(tmp_path):
    old = {f"axis/{REGISTER_KEY}": 8, "axis/seed_everything": 1, "stages/fit": "running"}
    (tmp_path / "summary.json").write_text(json.dumps(old))
    record = RunRecord(tmp_path)
    assert record.read() == {"num_registers": 8, "axis/seed_everything": 1, "stages/fit": "running"}
    # Today's key wins over the old one; the next update writes today's keys only.
    (tmp_path / "summary.json").write_text(json.dumps({**old, "num_registers": 4}))
    assert record.read()["num_registers"] == 4
    record.update({"status": "complete"})
    assert json.loads((tmp_path / "summary.json").read_text()) == {
        "num_registers": 4,
        "axis/seed_everything": 1,
        "stages/fit": "running",
        "status": "complete",
    }


@pytest.mark.parametrize(
    "text, problem",
    [('{"num_registers": 4, "probe/cls', "Unterminated string"), ("[1, 2]", "it holds a list, not a mapping")],
)
def test_an_unreadable_summary_is_one_line_naming_the_file(tmp_path, text, problem):
    (tmp_path / "summary.json").write_text(text)
    with pytest.raises(RegablateError) as err:
        RunRecord(tmp_path).read()
    assert str(err.value).startswith(f"cannot read {tmp_path / 'summary.json'}: ") and problem in str(err.value)
    assert "\n" not in str(err.value)


def test_the_report_skips_a_run_whose_summary_is_unreadable_and_says_so(tmp_path, capsys):
    experiment = tmp_path / "grid"
    good = {"num_registers": 0, "seed": 0, "status": "complete", "probe/cls_top1": 0.5}
    RunRecord(experiment / "r0_s0").update(good)
    RunRecord(experiment / "r2_s0").update({**good, "num_registers": 2})
    (experiment / "r2_s0" / "summary.json").write_text('{"num_registers": 2, "sta')  # truncated
    rows = collect_rows(experiment)
    assert [row["run"] for row in rows] == ["r0_s0"]
    err = capsys.readouterr().err
    assert err.startswith(f"report: skipped run r2_s0: cannot read {experiment / 'r2_s0' / 'summary.json'}: ")
    # The whole command writes the report of the other runs, no traceback.
    regablate_main(["report", str(experiment)])
    captured = capsys.readouterr()
    assert "skipped run r2_s0" in captured.err and "Traceback" not in captured.err
    assert "results.md" in captured.out and "| trained registers | 0 | 1 |" in (experiment / "results.md").read_text()
