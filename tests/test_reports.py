import json

import pytest

from lpt_peft.evaluation.reports import summarize_runs, summary_table


def write_run(path, rows):
    path.mkdir()
    (path / "results.json").write_text(json.dumps(rows))


def test_median_over_runs(tmp_path):
    for i, (overall, few) in enumerate([(60.0, 10.0), (70.0, 30.0), (65.0, None)]):
        write_run(tmp_path / f"r{i}", {"LPT": {"overall": overall, "many": 1.0, "medium": 2.0, "few": few}})
    summary = summarize_runs([tmp_path / f"r{i}" for i in range(3)])
    assert summary["LPT"]["overall"] == {"median": 65.0, "runs": [60.0, 70.0, 65.0]}
    assert summary["LPT"]["few"]["median"] == 20.0  # the run without a value is left out
    assert "**65.00** (60.0, 70.0, 65.0)" in summary_table(summary)


def test_missing_results_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="is 'nowhere' the output_dir of a finished run"):
        summarize_runs(["nowhere"])
