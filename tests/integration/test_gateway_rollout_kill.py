"""The gateway's kill-switch endpoint (an alert webhook): token required, the state written, the reason kept."""

from __future__ import annotations

import uuid

import pytest

from tasks.adapters.storage import LocalStore
from tasks.contracts import layout
from tasks.contracts.rollout import RolloutState
from tasks.serving.gateway import GatewaySettings, create_app
from tasks.steps import registry

pytestmark = [pytest.mark.integration,
              pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")]
TOKEN = "tok-" + uuid.uuid4().hex


def test_kill_endpoint_needs_the_token_and_puts_the_champion_back(kafka_cfg, mlpipe_env):
    from fastapi.testclient import TestClient

    store = LocalStore(mlpipe_env.home / "store")
    store.put_json(layout.rollout_state_key("digits"), RolloutState(
        model="digits", rollout_id="r9", mode="canary", share=50, champion="3", candidate="4",
        step="canary-50").model_dump())
    app = create_app(kafka_cfg, GatewaySettings(token=TOKEN))
    with TestClient(app) as client:
        assert client.post("/v1/rollout/digits/kill").status_code == 401
        assert RolloutState.model_validate(store.get_json(layout.rollout_state_key("digits"))).mode == "canary"
        alert = {"alerts": [{"labels": {"alertname": "MlpipeDlqRateHigh"}}]}  # an Alertmanager webhook body
        r = client.post("/v1/rollout/digits/kill", json=alert, headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 200, r.text
        assert r.json() == {"model": "digits", "was": {"mode": "canary", "share": 50.0, "candidate": "4",
                                                       "rollout_id": "r9"}, "state": "off", "champion": "3"}
    state = RolloutState.model_validate(store.get_json(layout.rollout_state_key("digits")))
    assert state.mode == "off" and state.killed["by"] == "gateway" and state.killed["reason"] == "MlpipeDlqRateHigh"
    assert [e["by"] for e in registry.events(store, "digits") if e["event"] == "rollout_kill"] == ["gateway"]
