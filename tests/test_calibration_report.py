"""scripts/calibration_report.py end to end: one runner process per configuration, the table, the plot and
report.md. The checkpoint is the calibration architecture after a few training steps (the report's plumbing does
not depend on what the model knows)."""

from __future__ import annotations

import pytest

from scripts import calibration_report, summarize
from scripts import train_calibration as training


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = training.train(steps=2, seed=1, batch_size=2, log_every=0, workers=0)
    return training.save(model, tmp_path_factory.mktemp("calibration") / "few-steps")


def test_plan_runs_stock_then_each_method_and_ratio_and_ratio_free_methods_once(checkpoint, tmp_path):
    jobs = calibration_report.plan(checkpoint, ["random_pre_llm", "vtw_intra_llm"], [0.5, 0.25], tmp_path)
    assert [job.label.split("__")[1] for job in jobs] == ["stock", "random_pre_llm-0.5", "random_pre_llm-0.25",
                                                          "vtw_intra_llm-0.5"]  # VTW ignores the keep ratio
    assert all("--judge" in job.command and str(checkpoint) in job.command for job in jobs)


def test_report_writes_table_plot_and_report(checkpoint, tmp_path):
    code = calibration_report.main(["--checkpoint", str(checkpoint), "--work-dir", str(tmp_path), "--samples", "12",
                                    "--methods", "random_pre_llm", "--ratios", "0.25", "--parallel", "2"])
    assert code == 0
    table = summarize.collect(tmp_path / "runs")
    assert sorted(table["method"]) == ["random_pre_llm", "stock"]
    assert set(table["samples"]) == {12}
    tokens = calibration_report.calibration_data.GRID ** 2
    assert table.loc[table["method"] == "random_pre_llm", "tokens_after"].item() == round(0.25 * tokens)
    report = (tmp_path / calibration_report.REPORT_FILE).read_text()
    assert "random_pre_llm" in report and "VTC_CLS_START_LAYER=-1" in report
    assert (tmp_path / calibration_report.PLOT_FILE).stat().st_size > 0
