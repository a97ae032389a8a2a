"""The retrain run's final outcome line (plugins/mlpipe_steps.describe_outcome): deployed or why not."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "plugins"))

from mlpipe_steps import describe_outcome  # noqa: E402


def test_deployed_only_when_qc_passed_and_deploy_returned():
    ok, line = describe_outcome({"verdict": "passed", "version": 4}, {"version": 4})
    assert ok and line.startswith("DEPLOYED: v4")


def test_rejection_names_the_reasons_and_the_report():
    ok, line = describe_outcome({"verdict": "failed", "version": 5, "reasons": ["accuracy: 0.9 < 0.95", "x: y"],
                                 "report_uri": "file:///r.html"}, None)
    assert not ok
    assert line.startswith("REJECTED: v5 failed the QC gate (accuracy: 0.9 < 0.95; x: y)")
    assert "champion keeps serving" in line and "file:///r.html" in line


@pytest.mark.parametrize("verdict, deployed, words", [
    ({"verdict": "passed", "version": 6}, None, "passed QC but deploy did not succeed"),
    (None, None, "ended before the QC gate"),
])
def test_other_ways_of_not_deploying(verdict, deployed, words):
    ok, line = describe_outcome(verdict, deployed)
    assert not ok and line.startswith("NOT DEPLOYED") and words in line
