"""The kill switch from the Airflow UI: the rollout_kill DAG on the shared local stack."""

from __future__ import annotations

import pytest

from tasks.contracts import layout
from tasks.contracts.rollout import RolloutState

pytestmark = pytest.mark.integration


def test_the_rollout_kill_dag_turns_the_canary_off_and_says_who(airflow_stack):
    store, client = airflow_stack.store, airflow_stack.client
    model = "killdag"  # a model of its own: the stack's consumer follows digits' rollout state
    store.put_json(layout.rollout_state_key(model), RolloutState(
        model=model, rollout_id="r-ui", mode="canary", share=10, champion="1", candidate="2",
        step="canary-10").model_dump())
    resp = client.trigger("rollout_kill", {"model": model, "reason": "UI test: stop it"})
    assert resp.status_code == 200, resp.text
    run = client.wait_run("rollout_kill", resp.json()["dag_run_id"], timeout=150)
    assert run["state"] == "success", run
    state = RolloutState.model_validate(store.get_json(layout.rollout_state_key(model)))
    assert state.mode == "off" and state.champion == "1"
    assert state.killed == {**state.killed, "by": "airflow-ui", "reason": "UI test: stop it"}
