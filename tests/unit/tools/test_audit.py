"""``mlpipe audit`` (tasks/tools/audit.py): a history is built (drops and runs registered, deploys, a QC verdict,
a failed and retried DAG run, drift reports, a burst of poison frames and error lines in the log folder), then a
minute inside it is asked about and every fact of the answer is checked; bad input gets a clear answer."""

from __future__ import annotations

import datetime as dt
import json
import logging
from pathlib import Path

import pytest

from tasks.contracts import layout
from tasks.contracts.errors import EXIT_BAD_INPUT
from tasks.logs import JsonFormatter
from tasks.steps import registry
from tasks.steps.data_docs import external_assets
from tasks.tools import audit
from tests.support.factories import fake_run

UTC = dt.timezone.utc
AT = dt.datetime(2026, 11, 24, 3, 47, tzinfo=UTC)
MODEL = "digits"
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


def t(minutes: float) -> dt.datetime:
    return AT + dt.timedelta(minutes=minutes)


class FakeRuns:
    """Our own RunSource protocol, answering as Airflow's REST API would for the window."""

    def __init__(self) -> None:
        self.asked: list[tuple[dt.datetime, dt.datetime]] = []

    def dag_runs_between(self, start, end):
        self.asked.append((start, end))
        return [
            {"dag_id": "retrain", "dag_run_id": "retrain__drop-c", "state": "failed", "conf": {"drop_id": "drop-c"},
             "start_date": t(-7).isoformat(), "end_date": t(-1).isoformat()},
            {"dag_id": "monitor", "dag_run_id": "scheduled__0330", "state": "running", "conf": {},
             "start_date": t(-2).isoformat(), "end_date": None},
        ]

    def task_instances_between(self, start, end):
        return [{"dag_id": "retrain", "dag_run_id": "retrain__drop-c", "task_id": "train", "try_number": 2,
                 "state": "failed", "start_date": t(-5).isoformat(), "end_date": t(-1).isoformat()},
                {"dag_id": "monitor", "dag_run_id": "scheduled__0330", "task_id": "check", "try_number": 1,
                 "state": "running", "start_date": t(-2).isoformat()}]


def _drift_report(store, at: dt.datetime, status: str, champion: int) -> None:
    stamp = at.strftime("%Y%m%dT%H%M%S%fZ")
    prefix = layout.monitor_report_prefix(stamp)
    store.put_text(prefix + "report.html", f"<html>{status}</html>")
    store.put_json(prefix + "report.json", {"model": MODEL, "champion": champion, "status": status,
                                            "drift": status == "drift", "created_at": at.isoformat(),
                                            "summary": f"{status} over 500 live predictions"})


def _log(folder: Path, service: str, at: dt.datetime, level: int, logger: str, message: str, **extra) -> str:
    """One line of the log folder, written by the log set-up's own file formatter."""
    record = logging.makeLogRecord({"name": logger, "levelno": level, "levelname": logging.getLevelName(level),
                                    "msg": message, "created": at.timestamp(), **extra})
    obj = json.loads(JsonFormatter(file=True).format(record))
    line = json.dumps({**obj, "service": service})  # as that service's own process names itself
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / f"{service}.log").open("a", encoding="utf-8") as fh:
        fh.write(line + "\n")
    return line


@pytest.fixture
def history(store, tmp_path):
    logs = tmp_path / "logs"
    # drops and training runs, registered by the registry itself
    fake_run(store, "run-a", "drop-a")
    fake_run(store, "run-b", "drop-b")
    v1 = registry.register(store, MODEL, "run-a", ["drop-a"], mirror=False)["version"]
    v2 = registry.register(store, MODEL, "run-b", ["drop-b"], mirror=False)["version"]
    retrain = {"dag_id": "retrain", "run_id": "retrain__drop-b", "task_id": "deploy", "try_number": "1"}
    ev = registry.record_event
    ev(store, MODEL, "deploy", at=t(-180), version=v1, previous=None, served="model.onnx", forced=False)
    ev(store, MODEL, "stage", at=t(-180), version=v1, stage="production", previous="candidate",
       reason="deployed after QC")
    ev(store, MODEL, "artifact", at=t(-12), version=v2, name="qc_report.json", field="qc",
       qc={"verdict": "passed", "accuracy": 0.97})
    ev(store, MODEL, "stage", at=t(-8.1), version=v2, stage="production", previous="candidate",
       reason="deployed after QC", airflow=retrain)
    ev(store, MODEL, "deploy", at=t(-8), version=v2, previous=v1, served="model.int8.onnx", forced=False,
       airflow=retrain)
    ev(store, MODEL, "deploy_failed", at=t(-3), version=3, reason="smoke test: 2 of 8 frames wrong")
    ev(store, MODEL, "rollout_started", at=t(-6), version=3, champion=v2, rollout_id="r-7", steps=["shadow", "c10"])
    ev(store, MODEL, "rollout_step", at=t(-4), version=3, rollout_id="r-7", step="c10", mode="canary", share=10.0)
    ev(store, MODEL, "rollout_rolled_back", at=t(1), version=3, champion=v2, rollout_id="r-7", step="c10",
       failed=["error_rate"])
    ev(store, MODEL, "rollback", at=t(6), version=v1, previous=v2, reason="v2 misclassifies 7s")
    ev(store, MODEL, "deploy", at=t(120), version=v2, previous=v1, served="model.onnx")  # after the window
    _drift_report(store, t(-47), "ok", v1)  # standing when the window opens
    _drift_report(store, t(-2), "drift", v2)
    _drift_report(store, t(90), "ok", v2)  # after the window
    # a burst of poison frames: the consumer logs each dead letter; one error line carries a trace id
    for i in range(12):
        _log(logs, "stream", t(-0.8) + dt.timedelta(seconds=3 * i), logging.INFO, "tasks.serving.consumer.loop",
             f"dead letter frames[0]@{100 + i}: undecodable frame")
    _log(logs, "stream", t(-0.5), logging.ERROR, "tasks.serving.consumer.loop",
         "Triton rejected a batch of 12 frame(s)", trace_id=TRACE, span_id="00f067aa0ba902b7")
    _log(logs, "gateway", t(100), logging.ERROR, "tasks.serving.gateway", "late error outside the window")
    with (logs / "stream.log").open("a") as fh:
        fh.write("INFO plain text line without a time\n")
    return {"logs": logs, "v1": v1, "v2": v2}


def test_a_minute_inside_the_history_is_explained(store, history):
    runs = FakeRuns()
    answer = audit.build_audit(store, MODEL, audit.parse_at("2026-11-24 03:47"), audit.parse_window("30m"),
                               runs=runs, log_dir=history["logs"])
    assert (answer.start, answer.end) == ("2026-11-24T03:32:00+00:00", "2026-11-24T04:02:00+00:00")
    assert runs.asked == [(t(-15), t(15))]

    # which version served, and why: v2's deploy 8 minutes before, by the retrain run, QC passed
    s = answer.serving
    assert s["version"] == history["v2"] and s["action"] == "deploy" and s["previous"] == history["v1"]
    assert s["since"] == t(-8).isoformat() and s["served"] == "model.int8.onnx"
    assert s["airflow"]["run_id"] == "retrain__drop-b" and "QC verdict: passed" in s["why"]
    assert "deployed after QC" in s["why"]
    # a canary was under way at that minute: 10% of the devices answered by v3 (rolled back a minute later)
    assert s["rollout"] == {"rollout_id": "r-7", "candidate": 3, "champion": history["v2"], "since": t(-6).isoformat(),
                            "step": "c10", "mode": "canary", "share": 10.0, "step_since": t(-4).isoformat()}
    assert any(f.kind == "rollout" and "rolled_back" in f.text and "r-7" in f.text for f in answer.timeline)

    kinds = [(f.kind, f.at) for f in answer.timeline]
    assert kinds == sorted(kinds, key=lambda k: k[1])  # one timeline, in time order
    texts = [f.text for f in answer.timeline]
    # deploys and rollbacks in the window, the failed deploy, not the ones outside it
    assert any(f.kind == "deploy" and f"deployed v{history['v2']}" in f.text and "retrain__drop-b" in f.text
               for f in answer.timeline)
    assert any(f.kind == "deploy_failed" and "smoke test" in f.text for f in answer.timeline)
    assert any(f.kind == "rollback" and "v2 misclassifies 7s" in f.text and f.at == t(6).isoformat()
               for f in answer.timeline)
    assert not any(f.at in (t(-180).isoformat(), t(120).isoformat()) for f in answer.timeline)
    # DAG runs: the failed one, its retried task, the running one
    runs_by_id = {r["run_id"]: r for r in answer.dag_runs}
    assert runs_by_id["retrain__drop-c"]["state"] == "failed"
    assert runs_by_id["retrain__drop-c"]["retried"] == ["train try 2 (failed)"]
    assert runs_by_id["scheduled__0330"]["state"] == "running" and runs_by_id["scheduled__0330"]["retried"] == []
    assert "retrain run retrain__drop-c ended failed" in texts
    assert any(f.kind == "retry" and "train try 2" in f.text for f in answer.timeline)
    # drift: the verdict in the window and the one standing when it opened
    assert [(r["status"], r["at"]) for r in answer.drift["reports"]] == [("drift", t(-2).isoformat())]
    assert answer.drift["standing"]["status"] == "ok" and answer.drift["standing"]["at"] == t(-47).isoformat()
    assert any(f.kind == "drift" and "DRIFT" in f.text for f in answer.timeline)
    # the burst of poison frames, per minute, from the consumer's log lines
    dlq = answer.metrics["dlq"]
    assert dlq["source"] == "log folder" and dlq["total"] == 12
    assert dlq["per_minute"] == {"2026-11-24T03:46": 12} and dlq["max"] == 12
    assert any(f.kind == "dlq" and f.text.startswith("12 frame(s)") for f in answer.timeline)
    # error lines with their trace id; none from outside the window
    assert [(e["service"], e["trace_id"]) for e in answer.errors] == [("stream", TRACE)]
    # lag is only known to Prometheus: said, not guessed
    assert answer.metrics["lag"] is None and any("MLPIPE_PROMETHEUS_URL" in n for n in answer.notes)
    assert not answer.empty

    text = audit.render_text(answer)
    assert f"serving: v{history['v2']} since {t(-8).isoformat()}" in text
    assert f"trace_id={TRACE}" in text and "12 dead letter(s)" in text and "retrain__drop-c: failed" in text
    assert f"rollout r-7 under way: candidate v3 at step c10 (canary 10%) since {t(-4).isoformat()}" in text
    page = audit.render_html(answer, report_href=lambda key: f"/store/{key}")
    assert external_assets(page) == [] and TRACE in page and "retrain__drop-c" in page
    assert f'href="/store/monitoring/{t(-2).strftime("%Y%m%dT%H%M%S%fZ")}/report.html"' in page
    json.dumps(answer.to_dict(), default=str)  # the --json answer serialises


def test_before_the_first_deploy_nothing_served(store, history):
    answer = audit.build_audit(store, MODEL, t(-240), audit.parse_window("10m"), log_dir=history["logs"])
    assert answer.serving is None and answer.timeline == [] and answer.empty
    assert "nothing was recorded in this window" in audit.render_text(answer)
    assert any("no Airflow API" in n for n in answer.notes)


def test_serving_follows_a_rollback(store, history):
    answer = audit.build_audit(store, MODEL, t(10), audit.parse_window("2m"), log_dir=history["logs"])
    assert answer.serving["version"] == history["v1"] and answer.serving["action"] == "rollback"
    assert "v2 misclassifies 7s" in answer.serving["why"]
    assert answer.serving["rollout"] is None  # the canary had ended


def test_a_source_that_fails_is_named_and_the_rest_still_answers(store, history):
    class Down:
        def dag_runs_between(self, start, end):
            raise ConnectionError("connection refused")

        task_instances_between = dag_runs_between

    answer = audit.build_audit(store, MODEL, AT, audit.parse_window("30m"), runs=Down(), log_dir=history["logs"])
    assert answer.serving["version"] == history["v2"]
    assert any("Airflow could not be read" in n and "connection refused" in n for n in answer.notes)


@pytest.mark.parametrize("text,when", [
    ("2026-11-24 03:47", AT), ("2026-11-24T03:47:00Z", AT), ("2026-11-24T04:47+01:00", AT),
])
def test_times_are_utc_unless_they_say_otherwise(text, when):
    assert audit.parse_at(text) == when


@pytest.mark.parametrize("text,seconds", [("30m", 1800), ("2h", 7200), ("90s", 90), ("1d", 86400), ("15", 900)])
def test_windows(text, seconds):
    assert audit.parse_window(text).total_seconds() == seconds


def test_the_cli_answers_and_refuses_bad_input_with_exit_2(mlpipe_env, store, history, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("MLPIPE_LOG_DIR", str(history["logs"]))
    for var in ("MLPIPE_AIRFLOW_API_URL", "MLPIPE_PROMETHEUS_URL"):
        monkeypatch.delenv(var, raising=False)
    html_out = tmp_path / "audit.html"
    assert audit.main(["--at", "2026-11-24 03:47", "--window", "30m", "--html", str(html_out)]) == 0
    out = capsys.readouterr().out
    assert f"serving: v{history['v2']}" in out and TRACE in out and "12 dead letter(s)" in out
    assert "DAG runs: no Airflow API" in out
    assert external_assets(html_out.read_text()) == [] and TRACE in html_out.read_text()

    assert audit.main(["--at", "2025-01-01 00:00"]) == 0
    assert "nothing was recorded in this window" in capsys.readouterr().out

    assert audit.main(["--at", "last tuesday"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "'last tuesday' is not a time" in err and "Traceback" not in err
    assert audit.main(["--at", "2026-11-24 03:47", "--window", "soon"]) == EXIT_BAD_INPUT
    assert "'soon' is not a duration" in capsys.readouterr().err


def test_registry_events_filter_by_time(store, history):
    inside = registry.events(store, MODEL, since=t(-15), until=t(15))
    assert [e["event"] for e in inside] == ["artifact", "stage", "deploy", "rollout_started", "rollout_step",
                                            "deploy_failed", "rollout_rolled_back", "rollback"]
    assert all(t(-15).isoformat() <= e["at"] <= t(15).isoformat() for e in inside)
    assert len(registry.events(store, MODEL)) == len(registry.events(store, MODEL, since=None)) > len(inside)
    assert registry.events(store, MODEL, until=t(-181)) == [e for e in registry.events(store, MODEL)
                                                          if e["at"] < t(-181).isoformat()]


def test_registry_events_record_the_airflow_run(store, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CTX_DAG_ID", "retrain")
    monkeypatch.setenv("AIRFLOW_CTX_DAG_RUN_ID", "manual__2026-11-24T03:40")
    monkeypatch.setenv("AIRFLOW_CTX_TASK_ID", "register")
    body = registry.record_event(store, MODEL, "probe", version=1)
    assert body["airflow"] == {"dag_id": "retrain", "run_id": "manual__2026-11-24T03:40", "task_id": "register"}
    assert registry.events(store, MODEL)[-1]["airflow"]["run_id"] == "manual__2026-11-24T03:40"


def test_registry_cli_events_take_a_window(mlpipe_env, store, history, capsys):
    assert registry.main(["events", "--since", "2026-11-24T03:32", "--until", "2026-11-24 04:02"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert [e["event"] for e in shown] == [e["event"] for e in registry.events(store, MODEL, since=t(-15),
                                                                              until=t(15))]
    assert registry.main(["events", "--since", "tuesday"]) == EXIT_BAD_INPUT
    assert "--since 'tuesday' is not a time" in capsys.readouterr().err
