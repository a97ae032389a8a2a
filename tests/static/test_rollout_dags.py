"""The rollout and rollout_kill DAGs: wiring only, rendered in both execution modes."""

from __future__ import annotations

import pytest

from tests.static.test_dag_structure import ROOT  # noqa: F401 - sets up the Airflow env and sys.path


@pytest.mark.parametrize("mode", ["local", "kubernetes"])
def test_rollout_dags_render_with_their_params(monkeypatch, mode):
    from airflow.dag_processing.dagbag import DagBag

    from mlpipe_steps import SERVING_POOL

    monkeypatch.setenv("MLPIPE_EXECUTION", mode)
    bag = DagBag(str(ROOT / "dags"))
    assert not bag.import_errors, bag.import_errors
    ro = bag.dags["rollout"]
    assert set(ro.params) >= {"model", "version", "steps", "window_s"}
    task = ro.get_task("rollout")
    args = list(task.arguments)
    assert args[:1] == ["run"] and "--version" in args and "{{ params.steps }}" in args
    assert task.retries == 0, "a rolled-back rollout is final; a retry would start a second one"
    assert task.pool == SERVING_POOL
    kill = bag.dags["rollout_kill"].get_task("kill")
    assert list(kill.arguments)[:1] == ["kill"] and "airflow-ui" in kill.arguments
    assert kill.pool != SERVING_POOL, "the kill switch must never queue behind the rollout it stops"
