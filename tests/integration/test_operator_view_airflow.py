"""The operator's view loaded by the real Airflow api-server of the shared local stack (``airflow_stack``, the one
the REST API and UI tests use: no second Airflow): the plugin is listed with its app and its navigation entry, the
app answers under ``/mlpipe`` only to a signed-in user, and its audit page reads DAG runs through the REST API
with that user's own token."""

from __future__ import annotations

import datetime as dt

import httpx
import pytest

pytestmark = [pytest.mark.integration]


def _auth(stack) -> dict[str, str]:
    return {"Authorization": f"Bearer {stack.client.token()}"}


def test_the_plugin_is_loaded_with_its_app_and_nav_entry(airflow_stack):
    plugins = {p["name"]: p for p in airflow_stack.client.get("/api/v2/plugins", limit=100)["plugins"]}
    ui = plugins["mlpipe_ui"]
    assert [a["url_prefix"] for a in ui["fastapi_apps"]] == ["/mlpipe"]
    view = ui["external_views"][0]
    assert view["name"] == "mlpipe" and view["href"] == "mlpipe/" and view["destination"] == "nav"
    assert view["url_route"] == "mlpipe"
    errors = airflow_stack.client.get("/api/v2/importErrors").get("import_errors", [])
    assert not [e for e in errors if "mlpipe_ui" in str(e)]


def test_the_view_needs_a_sign_in(airflow_stack):
    url = airflow_stack.url
    assert httpx.get(f"{url}/mlpipe/", timeout=30).status_code == 401
    assert httpx.get(f"{url}/mlpipe/", headers={"Authorization": "Bearer not-a-token"}, timeout=30).status_code in (
        401, 403)
    page = httpx.get(f"{url}/mlpipe/", headers=_auth(airflow_stack), timeout=60)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "mlpipe" in page.text
    # the UI's own cookie signs in too (the view is shown in the UI's frame)
    cookie = httpx.get(f"{url}/mlpipe/api/models", cookies={"_token": airflow_stack.client.token()}, timeout=60)
    assert cookie.status_code == 200 and isinstance(cookie.json(), list)


def test_the_audit_page_reads_dag_runs_as_the_signed_in_user(airflow_stack):
    client = airflow_stack.client  # retrain is paused: the run stays queued, in the window
    run_id = "ui_audit_probe"
    resp = client.trigger("retrain", {"drop_id": "audit-probe"}, run_id=run_id)
    assert resp.status_code in (200, 409), resp.text
    try:
        at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        page = httpx.get(f"{airflow_stack.url}/mlpipe/audit", params={"at": at, "window": "20m"},
                         headers=_auth(airflow_stack), timeout=90)
        assert page.status_code == 200, page.text[:500]
        assert run_id in page.text and "queued" in page.text
        assert "no Airflow API" not in page.text
    finally:
        client.request("PATCH", f"/api/v2/dags/retrain/dagRuns/{run_id}", json={"state": "failed"})


def test_the_cli_finds_the_stacks_airflow_and_prometheus(airflow_stack, monkeypatch, capsys):
    import json

    from tasks.local import stack
    from tasks.tools import audit

    monkeypatch.setenv("MLPIPE_HOME", str(airflow_stack.home))
    monkeypatch.setenv("MLPIPE_STORE_URL", f"file://{airflow_stack.home / 'store'}")
    for var in ("MLPIPE_AIRFLOW_API_URL", "MLPIPE_PROMETHEUS_URL", "MLPIPE_LOG_DIR"):
        monkeypatch.delenv(var, raising=False)
    run_id = "cli_audit_probe"
    airflow_stack.client.trigger("retrain", {"drop_id": "audit-probe"}, run_id=run_id)
    try:
        assert audit.main(["--at", "now", "--window", "20m", "--json"]) == 0
        answer = json.loads(capsys.readouterr().out)
    finally:
        airflow_stack.client.request("PATCH", f"/api/v2/dags/retrain/dagRuns/{run_id}", json={"state": "failed"})
    assert run_id in {r["run_id"] for r in answer["dag_runs"]}
    assert not [n for n in answer["notes"] if n.startswith("DAG runs")]
    if (stack.read_state(airflow_stack.home) or {}).get("urls", {}).get("prometheus"):
        # the stack's Prometheus answered (its series may still be empty right after `make up`)
        assert not [n for n in answer["notes"] if n.startswith("metrics:")], answer["notes"]
