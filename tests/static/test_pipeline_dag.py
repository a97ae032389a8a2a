"""The retrain_pipeline DAG: per-member train/register/compile/QC, one pipeline QC and deploy (wiring only)."""

from __future__ import annotations

import pytest

from tests.static.test_dag_structure import ROOT  # noqa: F401 - sets up the Airflow env and sys.path


@pytest.mark.parametrize("mode", ["local", "kubernetes"])
def test_the_pipeline_retrain_graph(monkeypatch, mode):
    from airflow.dag_processing.dagbag import DagBag

    from mlpipe_steps import SERVING_POOL

    monkeypatch.setenv("MLPIPE_EXECUTION", mode)
    bag = DagBag(str(ROOT / "dags"))
    assert not bag.import_errors, bag.import_errors
    dag = bag.dags["retrain_pipeline"]
    assert set(dag.params) >= {"pipeline", "members", "drop_id", "epochs", "seed"}
    for role in ("detector", "classifier"):
        chain = [f"retrain_{role}", f"train_{role}", f"register_{role}", f"compile_{role}", f"qc_{role}",
                 f"qc_gate_{role}"]
        for up, down in zip(chain, chain[1:]):
            assert down in dag.get_task(up).downstream_task_ids, (up, down)
        assert "compose" in dag.get_task(f"qc_gate_{role}").downstream_task_ids
        assert f"['{role}']" in " ".join(dag.get_task(f"register_{role}").arguments) or mode == "kubernetes"
    assert dag.get_task("compose").trigger_rule == "none_failed", "a member left out (skipped) must not stop compose"
    for up, down in (("compose", "pipeline_qc"), ("pipeline_qc", "pipeline_qc_gate"), ("pipeline_qc_gate", "deploy"),
                     ("deploy", "outcome")):
        assert down in dag.get_task(up).downstream_task_ids, (up, down)
    deploy = dag.get_task("deploy")
    assert deploy.pool == SERVING_POOL
    assert list(deploy.arguments)[:3] == ["deploy", "--pipeline", "{{ params.pipeline }}"]


def test_the_outcome_names_a_rejected_member():
    from mlpipe_steps import describe_pipeline_outcome

    ok, line = describe_pipeline_outcome(None, None, [
        {"model": "scenes-detector", "version": 4, "verdict": "failed", "reasons": ["recall: 0.41"],
         "report_uri": "file:///r.html"}, None])
    assert not ok and line.startswith("REJECTED: member scenes-detector v4") and "recall: 0.41" in line
    ok, line = describe_pipeline_outcome({"version": 2, "verdict": "passed"}, {"deployed_version": 2},
                                         [{"verdict": "passed"}, None])
    assert ok and "DEPLOYED" in line
