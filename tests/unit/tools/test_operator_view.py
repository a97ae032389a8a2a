"""The operator's view (tasks/tools/operator_view.py) through FastAPI's TestClient, against a store built here by
the steps themselves: a drop validated by Great Expectations (its Data Docs must render offline), a training run
registered by the registry inside an Airflow task's environment, a QC report, a deploy, a drift report and a
rollout report. Pages, lineage, reports, the audit page and what is refused."""

from __future__ import annotations

import datetime as dt
import posixpath
import re

import pytest

from tasks.contracts import layout
from tasks.steps import drops, registry, validate
from tasks.steps.data_docs import external_assets
from tasks.tools.operator_view import create_app, servable
from tests.support.factories import digits_onnx_bytes

MODEL = "digits"
DROP = "drop-ui"
RUN = "run-ui"
AIRFLOW_RUN = "manual__2026-11-24T03:30:00+00:00"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One store with a whole version's history (module scope: GX runs once)."""
    from tasks.adapters.storage import LocalStore

    mp = pytest.MonkeyPatch()
    home = tmp_path_factory.mktemp("operator-view")
    mp.setenv("MLPIPE_HOME", str(home))
    mp.setenv("MLPIPE_STORE_URL", f"file://{home / 'store'}")
    mp.setenv("MLPIPE_LOG_DIR", str(home / "logs"))
    store = LocalStore(home / "store")
    drops.make_drop(store, DROP, size=120, seed=3)
    assert validate.validate_drop(store, DROP, min_rows=100).success
    store.put_json(layout.run_file_key(RUN, layout.METRICS), {"val_accuracy": 0.951, "clearml_task_id": "offline-7"})
    store.put_bytes(layout.run_file_key(RUN, layout.MODEL_ONNX), digits_onnx_bytes())
    # the retrain DAG's tasks: Airflow's task runner exports AIRFLOW_CTX_* to the step's process
    mp.setenv("AIRFLOW_CTX_DAG_ID", "retrain")
    mp.setenv("AIRFLOW_CTX_DAG_RUN_ID", AIRFLOW_RUN)
    mp.setenv("AIRFLOW_CTX_TASK_ID", "register")
    version = registry.register(store, MODEL, RUN, [DROP], mirror=False)["version"]
    mp.setenv("AIRFLOW_CTX_TASK_ID", "qc")
    registry.record_artifact(store, MODEL, version, layout.QC_REPORT_HTML, b"<html><h1>QC passed</h1></html>")
    registry.record_artifact(store, MODEL, version, layout.QC_REPORT_JSON, {"verdict": "passed"}, field="qc",
                             summary={"verdict": "passed", "accuracy": 0.95})
    mp.setenv("AIRFLOW_CTX_TASK_ID", "deploy")
    registry.set_stage(store, MODEL, version, "production", "deployed after QC", mirror=False)
    registry.record_event(store, MODEL, "deploy", version=version, previous=None, served="model.int8.onnx",
                          forced=False)
    registry.record_event(store, MODEL, "rollout_step", version=2, rollout_id="r-1", step="c10", mode="canary",
                          share=10.0)
    for var in ("AIRFLOW_CTX_DAG_ID", "AIRFLOW_CTX_DAG_RUN_ID", "AIRFLOW_CTX_TASK_ID"):
        mp.delenv(var)
    stamp = "20261124T034500000000Z"
    store.put_text(f"monitoring/{stamp}/report.html", "<html>drift report</html>")
    store.put_json(f"monitoring/{stamp}/report.json", {"model": MODEL, "champion": version, "status": "drift",
                                                       "drift": True, "summary": "drift past the threshold in psi"})
    store.put_json(f"rollouts/{MODEL}/state.json", {"mode": "canary", "champion": version, "candidate": 2,
                                                    "share": 10.0})
    store.put_text(f"rollouts/{MODEL}/r-1/report.html", "<html>rollout r-1: promoted</html>")
    store.put_json(f"rollouts/{MODEL}/r-1/evidence/consumer-0.json", {"frames": 10})
    yield store, version
    mp.undo()


@pytest.fixture
def client(built):
    from fastapi.testclient import TestClient

    store, _ = built
    with TestClient(create_app(lambda: store)) as c:
        yield c


def test_index_shows_serving_state_versions_history_drift_and_rollouts(client, built):
    _, version = built
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    text = page.text
    assert f"production version: <b>v{version}</b>" in text and "serving model.int8.onnx" not in text
    assert "stage-production" in text and "0.951" in text and ">passed<" in text
    assert AIRFLOW_RUN in text  # the deploy history names the DAG run that deployed
    assert "drift past the threshold in psi" in text and "/store/monitoring/20261124T034500000000Z/report.html" in text
    assert "mode <b>canary</b>" in text and "/store/rollouts/digits/r-1/report.html" in text
    assert "rollout r-1, step c10, mode canary, share 10.0" in text  # each rollout step is in the history
    assert external_assets(text) == []


def test_lineage_from_drop_to_deploy_with_the_airflow_runs(client, built):
    store, version = built
    lin = client.get(f"/api/models/{MODEL}/versions/{version}/lineage").json()
    validated = store.get_json(layout.validation_result_key(DROP))
    assert [d["drop_id"] for d in lin["drops"]] == [DROP]
    assert lin["drops"][0]["manifest_sha256"] == validated["manifest_sha256"]
    assert lin["drops"][0]["data_docs_key"] == layout.data_docs_index_key(DROP)
    assert lin["training"]["run_id"] == RUN and lin["training"]["clearml_task_id"] == "offline-7"
    assert lin["register"]["airflow"]["run_id"] == AIRFLOW_RUN and lin["register"]["airflow"]["task_id"] == "register"
    assert lin["qc"]["verdict"] == "passed" and lin["qc"]["airflow"]["task_id"] == "qc"
    assert lin["qc"]["report_key"] == layout.version_file_key(MODEL, version, layout.QC_REPORT_HTML)
    assert [(d["event"], d["airflow"]["task_id"]) for d in lin["deploys"]] == [("deploy", "deploy")]

    page = client.get(f"/models/{MODEL}/versions/{version}").text
    for fact in (DROP, validated["manifest_sha256"][:16], RUN, AIRFLOW_RUN, "GX Data Docs", "QC report"):
        assert fact in page, fact
    assert client.get(f"/models/{MODEL}/versions/99").status_code == 404
    # a prediction's lineage id leads to the same page
    assert client.get(f"/lineage/{MODEL}/{version}").url.path == f"/models/{MODEL}/versions/{version}"
    bad = client.get("/lineage/not-a-lineage")
    assert bad.status_code == 400 and "is not a lineage id" in bad.json()["detail"]


def test_data_docs_are_served_and_render_offline(client):
    index = client.get(f"/store/{layout.data_docs_index_key(DROP)}")
    assert index.status_code == 200 and index.headers["content-type"].startswith("text/html")
    assert external_assets(index.text) == []
    assert "<script" not in index.text.lower()
    # the validation-results table GX draws in the browser is in the page itself, its row a link
    rows = re.findall(r"<tbody>(.*?)</tbody>", index.text, re.DOTALL)
    assert rows and f"drop-{DROP}" in rows[0]
    page_link = re.search(r'<a href="(validations/[^"]+\.html)">open</a>', index.text).group(1)
    page = client.get(f"/store/{layout.data_docs_prefix(DROP)}{page_link}")
    assert page.status_code == 200 and external_assets(page.text) == [] and "Succeeded" in page.text
    # its images are the site's own copies (the logo was a remote one), relative, and served from the store too
    assets = re.findall(r'<img\b[^>]*\bsrc="([^"#:]+)"', page.text)
    assert assets
    folder = posixpath.dirname(f"{layout.data_docs_prefix(DROP)}{page_link}")
    for asset in set(assets):
        assert client.get(f"/store/{posixpath.normpath(posixpath.join(folder, asset))}").status_code == 200, asset


def test_reports_are_served_and_nothing_else(client, built):
    _, version = built
    qc = client.get(f"/store/models/{MODEL}/{version}/qc_report.html")
    assert qc.status_code == 200 and "QC passed" in qc.text
    assert client.get("/store/rollouts/digits/r-1/report.html").text.startswith("<html>rollout r-1")
    assert client.get(f"/store/models/{MODEL}/{version}/model.onnx").status_code == 404
    assert client.get("/store/runs/run-ui/metrics.json").status_code == 404
    assert client.get(f"/store/models/{MODEL}/{version}/qc_report.json").status_code == 200
    assert client.get(f"/store/models/{MODEL}/77/qc_report.html").status_code == 404
    assert not servable("drops/x/validation/data_docs/../../../../etc/passwd")
    assert not servable("/etc/passwd")


def test_json_api(client, built):
    _, version = built
    ov = client.get(f"/api/models/{MODEL}").json()
    assert ov["serving"]["version"] == version and ov["serving"]["rollout"]["mode"] == "canary"
    assert [v["version"] for v in ov["versions"]] == [version] and ov["versions"][0]["qc_verdict"] == "passed"
    assert [h["event"] for h in ov["history"]] == ["deploy", "rollout_step"]
    assert client.get("/api/models").json() == [MODEL]
    missing = client.get("/api/models/nope")
    assert missing.status_code == 404 and "no model 'nope'" in missing.json()["detail"]


def test_audit_page(client, built):
    _, version = built
    form = client.get("/audit")
    assert form.status_code == 200 and 'name="at"' in form.text
    bad = client.get("/audit", params={"at": "yesterday-ish"})
    assert bad.status_code == 400 and "is not a time" in bad.text
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")  # after the deploy
    page = client.get("/audit", params={"at": now, "window": "60m", "model": MODEL})
    assert page.status_code == 200 and external_assets(page.text) == []
    assert f"<b>v{version}</b> since" in page.text and "deployed after QC" in page.text
    assert "DAG runs: no Airflow API" in page.text  # none given to this app: said so
    quiet = client.get("/audit", params={"at": "2020-01-01 00:00", "window": "5m"})
    assert "Nothing was recorded in this window" in quiet.text


def test_an_empty_registry_says_so(tmp_path):
    from fastapi.testclient import TestClient

    from tasks.adapters.storage import LocalStore

    with TestClient(create_app(lambda: LocalStore(tmp_path / "empty"))) as c:
        assert "No model has been registered yet" in c.get("/").text


def test_routes_are_guarded_by_the_given_dependency(built):
    from fastapi import Depends, Header, HTTPException
    from fastapi.testclient import TestClient

    store, _ = built

    def signed_in(authorization: str | None = Header(None)) -> None:
        if authorization != "Bearer good":
            raise HTTPException(401, "Not authenticated")

    with TestClient(create_app(lambda: store, dependencies=[Depends(signed_in)])) as c:
        assert c.get("/").status_code == 401
        assert c.get(f"/store/{layout.data_docs_index_key(DROP)}").status_code == 401
        assert c.get("/", headers={"Authorization": "Bearer good"}).status_code == 200
