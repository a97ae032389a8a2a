"""Manual triggers through Airflow's REST API (``POST /api/v2/dags/<id>/dagRuns``) on the running stack:
typed params with titles and descriptions (the UI form is built from them), invalid values refused with a
message naming the param and the rule, valid ones starting a run with exactly that conf, and a run that
fails telling why.
"""

from __future__ import annotations

from urllib.parse import quote

import httpx
import pytest


pytestmark = [pytest.mark.integration]

REFUSED = [
    ("retrain", {"epochs": 0}, "epochs", "0 is less than the minimum of 1"),
    ("retrain", {"epochs": 101}, "epochs", "101 is greater than the maximum of 100"),
    ("retrain", {"epochs": "ten"}, "epochs", "'ten' is not of type 'integer'"),
    ("retrain", {"drop_id": "../etc"}, "drop_id", "does not match"),
    ("retrain", {"drop_id": ""}, "drop_id", "should be non-empty"),
    ("retrain", {"seed": -1}, "seed", "less than the minimum of 0"),
    ("retrain", {"extra_drop_ids": "a,b"}, "extra_drop_ids", "is not of type 'array', 'null'"),
    ("retrain", {"extra_drop_ids": ["ok", "no/slash"]}, "extra_drop_ids", "does not match"),
    ("retrain", {"model": "../Digits"}, "model", "does not match"),
    ("rollback", {"version": 0}, "version", "0 is less than the minimum of 1"),
    ("rollback", {"version": "latest"}, "version", "is not of type 'integer'"),
    ("rollback", {"reason": "x" * 201}, "reason", "is too long"),
    ("scheduled_retrain", {"epochs": 0}, "epochs", "less than the minimum of 1"),
    ("monitor", {"source": "files"}, "source", "'files' is not one of ['kafka', 'qdrant']"),
]


def _run_ids(client, dag_id: str) -> set[str]:
    return {r["dag_run_id"] for r in client.dag_runs(dag_id)}


@pytest.mark.parametrize("dag_id,expected", [
    ("retrain", {"model": "string", "drop_id": "string", "epochs": "integer", "seed": "integer",
                 "extra_drop_ids": ["array", "null"]}),
    ("rollback", {"model": "string", "version": "integer", "reason": "string"}),
])
def test_trigger_forms_have_typed_params_with_descriptions(airflow_stack, dag_id, expected):
    params = airflow_stack.client.get(f"/api/v2/dags/{dag_id}/details")["params"]
    assert {name: p["schema"]["type"] for name, p in params.items()} == expected
    for name, p in params.items():
        assert p["schema"].get("title"), f"{dag_id}.{name} has no title"
        assert len(p.get("description") or "") > 20, f"{dag_id}.{name} has no description"


@pytest.mark.parametrize("dag_id,conf,param,words", REFUSED, ids=[f"{d}-{p}-{i}" for i, (d, _, p, _w) in
                                                                   enumerate(REFUSED)])
def test_invalid_params_are_refused_with_a_clear_message(airflow_stack, dag_id, conf, param, words):
    client = airflow_stack.client
    before = _run_ids(client, dag_id)
    resp = client.trigger(dag_id, conf)
    assert resp.status_code == 400, resp.text
    detail = resp.json()["detail"]
    assert detail.startswith(f"Invalid input for param {param}: "), detail
    assert words in detail.splitlines()[0], detail
    assert _run_ids(client, dag_id) == before  # nothing was started


def test_valid_retrain_trigger_starts_a_run_with_that_conf(airflow_stack):
    client = airflow_stack.client  # retrain is paused: the run stays queued
    conf = {"drop_id": "some-drop", "epochs": 1, "seed": 7, "extra_drop_ids": ["older-1", "older-2"]}
    resp = client.trigger("retrain", conf, run_id="api_manual_retrain")
    assert resp.status_code == 200, resp.text
    run = client.dag_run("retrain", "api_manual_retrain")
    assert run["conf"] == conf and run["run_type"] == "manual" and run["state"] == "queued"
    again = client.trigger("retrain", conf, run_id="api_manual_retrain")
    assert again.status_code == 409  # a run id is unique
    client.request("PATCH", "/api/v2/dags/retrain/dagRuns/api_manual_retrain", json={"state": "failed"})


def test_rollback_to_an_unknown_version_runs_and_fails_saying_why(airflow_stack):
    client = airflow_stack.client
    resp = client.trigger("rollback", {"version": 42, "reason": "REST API test"})
    assert resp.status_code == 200, resp.text
    run_id = resp.json()["dag_run_id"]
    run = client.wait_run("rollback", run_id, timeout=150)
    assert run["state"] == "failed"
    ti = client.get(f"/api/v2/dags/rollback/dagRuns/{quote(run_id, safe='')}/taskInstances/rollback")
    assert ti["state"] == "failed" and ti["try_number"] == 1  # a final error: not retried
    log = client.request("GET", f"/api/v2/dags/rollback/dagRuns/{quote(run_id, safe='')}/taskInstances/rollback/"
                                "logs/1", params={"full_content": "true"}, headers={"Accept": "application/json"})
    assert "has no version 42" in str(log.json()["content"])


def test_the_api_needs_a_login(airflow_stack):
    url = airflow_stack.url
    assert httpx.post(f"{url}/api/v2/dags/retrain/dagRuns", json={"logical_date": None}).status_code == 401
    bad = httpx.post(f"{url}/auth/token", json={"username": "admin", "password": "wrong"})
    assert bad.status_code in (401, 403)
