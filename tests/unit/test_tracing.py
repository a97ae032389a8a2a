"""tasks/tracing.py and the log folder of tasks/logs.py: spans of one frame, the span store, OTLP/HTTP export,
log lines with trace ids, rotation shared by processes; ``mlpipe trace`` and ``mlpipe lineage``."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tasks import logs, tracing
from tasks.contracts.messages import H_TRACEPARENT

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def fresh(tmp_path, monkeypatch):
    """A log folder of the test's own; tracing and the handlers of the test undone afterwards."""
    monkeypatch.setenv("MLPIPE_LOG_DIR", str(tmp_path / "logs"))
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    monkeypatch.delenv("TRACEPARENT", raising=False)
    monkeypatch.delenv("AIRFLOW_CTX_DAG_RUN_ID", raising=False)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield tmp_path / "logs"
    tracing.shutdown()
    tracing._state.pop("bind", None)
    tracing._state.pop("bound_version", None)
    logs.bind(model_version=None, run_id=None)
    for h in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(h)
        h.close()
    root.setLevel(level)


@dataclass
class Rec:  # what start_batch reads of a Kafka record
    headers: dict = field(default_factory=dict)


def _frame_through_the_stack(frame_id: str) -> dict:
    """A frame as the gateway and the consumer trace it (two set-ups: two services, one store)."""
    tracing.setup_tracing("gateway", force=True)
    with tracing.span("POST /v1/frames", kind="server") as request:
        pub = tracing.start_publish("frames", frame_id, "cam-1")
        time.sleep(0.002)
        pub.end()
    gateway_trace = f"{request.get_span_context().trace_id:032x}"
    tracing.setup_tracing("stream", force=True)  # flushes the gateway's spans
    seen = {}

    def infer(frames):
        seen["metadata"] = tracing.trace_headers()  # what the Triton adapter sends
        time.sleep(0.003)
        return {"n": len(frames)}

    other = str(uuid.uuid4())
    batch = tracing.start_batch([Rec({H_TRACEPARENT: pub.traceparent.encode()}), Rec({})], [frame_id, other],
                                model="digits", started_at=time.time())
    assert batch.run(infer)([b"a", b"b"]) == {"n": 2}
    time.sleep(0.002)
    batch.finish(version="3", predicted=2, produced_at=time.time() - 0.001, kafka_s=0.001, qdrant_s=0.0005,
                 points=2)
    tracing.flush()
    return {"traceparent": pub.traceparent, "gateway_trace": gateway_trace, "metadata": seen["metadata"]}


def test_one_frames_spans_land_in_the_store_and_mlpipe_trace_shows_its_path(fresh, capsys):
    from tasks.tools import trace

    fid = str(uuid.uuid4())
    got = _frame_through_the_stack(fid)
    spans = list(tracing.read_spans())
    by_name = {s["name"]: s for s in spans}
    assert set(by_name) == {"POST /v1/frames", "frames publish", "consumer batch", "triton infer", "kafka produce",
                            "qdrant upsert"}
    pub, batch, infer = by_name["frames publish"], by_name["consumer batch"], by_name["triton infer"]
    # the Kafka hop: the frame's traceparent header is the publish span; the batch links to it
    assert got["traceparent"] == f"00-{pub['trace_id']}-{pub['span_id']}-01"
    assert pub["parent_span_id"] == by_name["POST /v1/frames"]["span_id"] and pub["trace_id"] == got["gateway_trace"]
    assert batch["links"] == [{"trace_id": pub["trace_id"], "span_id": pub["span_id"]}]
    assert batch["service"] == "stream" and pub["service"] == "gateway" and pub["kind"] == "producer"
    assert batch["attributes"]["mlpipe.lineage"] == "digits/3" and batch["attributes"]["mlpipe.model_version"] == "3"
    assert batch["attributes"]["mlpipe.frame_ids"].split(",")[0] == fid
    # Triton gets the infer span's context as metadata; the sinks are children of the batch
    assert got["metadata"] == {"traceparent": f"00-{infer['trace_id']}-{infer['span_id']}-01"}
    for name in ("triton infer", "kafka produce", "qdrant upsert"):
        assert by_name[name]["parent_span_id"] == batch["span_id"], name
    assert infer["duration_ms"] >= 3.0 and by_name["kafka produce"]["end_ns"] <= by_name["qdrant upsert"]["end_ns"]
    assert all(s["start"].endswith("+00:00") and s["status"] in ("unset", "ok") for s in spans)

    assert trace.main([fid]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"frame {fid} (trace {pub['trace_id']}; lineage digits/3")
    names = out[1:]
    order = ["POST /v1/frames", "frames publish", "consumer batch", "triton infer", "kafka produce", "qdrant upsert"]
    positions = [next(i for i, ln in enumerate(names) if name in ln) for name in order]
    assert positions == sorted(positions), out  # in time order: gateway -> Kafka -> batch -> Triton -> sinks
    offsets = [float(ln.split("ms")[0].strip().lstrip("+")) for ln in out[1:]]
    assert offsets == sorted(offsets) and offsets[0] == 0.0
    assert any("gateway" in ln and "frames publish" in ln and "topic frames" in ln for ln in out)
    assert any("stream" in ln and "model digits v3" in ln for ln in out)
    # the other frame of the batch finds the batch (no gateway span: it did not come through one)
    assert trace.main([batch["attributes"]["mlpipe.frame_ids"].split(",")[1]]) == 0
    assert "no gateway span" in capsys.readouterr().out


def test_bad_frame_ids_get_a_clear_answer_not_a_traceback(fresh, capsys):
    from tasks.tools import trace

    assert trace.main(["not-a-frame"]) == 2
    err = capsys.readouterr().err
    assert "error: 'not-a-frame' is not a frame id" in err and "Traceback" not in err
    missing = str(uuid.uuid4())
    assert trace.main([missing]) == 2
    err = capsys.readouterr().err
    assert f"error: no span of frame {missing}" in err and "nothing has been traced here yet" in err
    _frame_through_the_stack(str(uuid.uuid4()))  # a store that holds other frames
    assert trace.main([missing]) == 2
    assert "MLPIPE_TRACE_SAMPLE" in capsys.readouterr().err


def test_nothing_is_recorded_before_setup_or_when_off(fresh, monkeypatch):
    assert not tracing.enabled() and tracing.start_batch([Rec()], ["x"]) is tracing.NO_BATCH
    assert tracing.trace_headers() is None and tracing.start_publish("frames", "f").traceparent is None
    tracing.NO_BATCH.finish(version="7")  # a consumer inside another process binds nothing
    assert "model_version" not in logs.current_context()
    monkeypatch.setenv("MLPIPE_TRACING", "off")
    assert tracing.setup_process("stream") is False
    tracing.NO_BATCH.finish(version="7")  # the service's served version reaches its log lines, traced or not
    assert logs.current_context().get("model_version") == "7"
    monkeypatch.setenv("MLPIPE_TRACING", "off")
    assert tracing.setup_tracing("x", force=True) is False and not tracing.enabled()
    monkeypatch.setenv("MLPIPE_TRACING", "on")
    monkeypatch.setenv("MLPIPE_TRACE_SAMPLE", "2")
    with pytest.raises(ValueError, match="MLPIPE_TRACE_SAMPLE"):
        tracing.setup_tracing("x", force=True)
    assert not fresh.exists() or not (fresh / tracing.SPAN_FILE).exists()


def test_sampling_keeps_a_sampled_parent_and_drops_unsampled_batches(fresh, monkeypatch):
    monkeypatch.setenv("MLPIPE_TRACE_SAMPLE", "0")
    tracing.setup_tracing("stream", force=True, batch=False)
    assert tracing.start_batch([Rec()], ["a"]) is tracing.NO_BATCH  # a new trace at ratio 0
    parent = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"
    with tracing.span("continued", context=tracing.context_from_traceparent(parent)) as s:
        assert s.is_recording() and f"{s.get_span_context().trace_id:032x}" == "ab" * 16
    # a batch holding a sampled frame is kept (linked to that frame only), whatever the ratio
    unsampled = "00-" + "ef" * 16 + "-" + "cd" * 8 + "-00"
    batch = tracing.start_batch([Rec({H_TRACEPARENT: parent.encode()}), Rec({H_TRACEPARENT: unsampled.encode()})],
                                ["a", "b"])
    assert batch is not tracing.NO_BATCH
    batch.finish(version="1")
    assert tracing.start_batch([Rec({H_TRACEPARENT: unsampled.encode()})], ["b"]) is tracing.NO_BATCH
    (kept,) = [s for s in tracing.read_spans() if s["name"] == "consumer batch"]
    assert kept["links"] == [{"trace_id": "ab" * 16, "span_id": "cd" * 8}]
    assert tracing.parse_traceparent(b"garbage") is None and tracing.parse_traceparent("00-" + "0" * 32 + "-" +
                                                                                        "cd" * 8 + "-01") is None


def test_span_store_rotates_by_size_and_is_read_across_files(fresh):
    exporter = tracing.SpanStoreExporter(fresh / tracing.SPAN_FILE, max_bytes=4000, backups=2)
    tracing.setup_tracing("stream", force=True, exporter=exporter, batch=False)
    for i in range(60):
        with tracing.span("s", attributes={"i": i}):
            pass
    files = tracing.store_files(fresh / tracing.SPAN_FILE)
    assert [f.name for f in files] == ["spans.jsonl.2", "spans.jsonl.1", "spans.jsonl"]
    assert all(f.stat().st_size <= 4000 for f in files)
    seen = [s["attributes"]["i"] for s in tracing.read_spans(fresh / tracing.SPAN_FILE)]
    assert seen == sorted(seen) and seen[-1] == 59 and len(seen) < 60  # bounded: the oldest were dropped


@pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")
def test_otlp_http_export_when_the_endpoint_is_set(fresh, monkeypatch):
    from fastapi.testclient import TestClient

    from tasks.adapters.kafka import KafkaConfig
    from tasks.config import load_settings
    from tasks.local.procs import free_port
    from tasks.serving.gateway import GatewaySettings, create_app
    from tests.support.otlp import OtlpReceiver

    with OtlpReceiver() as rx:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", rx.endpoint)
        assert tracing.setup_tracing("gateway", force=True)
        try:
            # the real gateway app, its broker a closed loopback port: the produce fails fast, the spans remain
            kafka = KafkaConfig(bootstrap=f"127.0.0.1:{free_port()}", topic_prefix="otlp.")
            app = create_app(kafka, GatewaySettings(token="tok-otlp-test", create_topics=False,
                                                    follow_predictions=False, produce_timeout_s=0.5))
            raw = bytes(load_settings().model_spec("digits").frames.raw_bytes)
            with TestClient(app) as client:
                r = client.post("/v1/frames", content=raw, headers={
                    "Authorization": "Bearer tok-otlp-test", "Content-Type": "application/x-raw-uint8",
                    "traceparent": "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"})
                assert r.status_code == 503  # no broker
                assert client.get("/healthz").status_code == 200  # not traced
            assert tracing.flush(10)
        finally:
            tracing.shutdown()
        received = rx.spans()
        path, ctype, _req = rx.requests[0]
    assert path == "/v1/traces" and ctype == "application/x-protobuf"
    assert not (fresh / tracing.SPAN_FILE).exists()  # OTLP instead of the local store
    names = {s.name for _svc, s in received}
    assert {svc for svc, _s in received} == {"gateway"} and {"frames publish", "POST /v1/frames"} <= names, names
    assert not any("healthz" in n for n in names)
    pub = next(s for _svc, s in received if s.name == "frames publish")
    assert pub.trace_id.hex() == "ab" * 16  # the incoming traceparent was continued
    assert pub.status.code == 2  # ERROR: the broker never acknowledged
    attrs = {a.key: a.value.string_value for a in pub.attributes}
    assert attrs["mlpipe.frame_id"] and attrs["messaging.destination.name"] == "otlp.frames"


def test_log_lines_carry_the_span_ids_run_id_and_model_version(fresh, monkeypatch, capsys):
    logs.set_service("unit-svc")
    try:
        logs.setup_logging("INFO", "json")
        tracing.setup_tracing("unit-svc", force=True, batch=False)
        log = logging.getLogger("tasks.unit")
        with tracing.span("work") as s:
            log.info("inside")
        monkeypatch.setenv("TRACEPARENT", "00-" + "12" * 16 + "-" + "34" * 8 + "-01")
        monkeypatch.setenv("AIRFLOW_CTX_DAG_RUN_ID", "manual__2026-11-24")
        logs.bind(model_version="5")
        log.warning("from the parent's env")
        with logs.context(run_id="train-r7"):
            log.info("scoped")
    finally:
        logs._service.clear()
    lines = [json.loads(ln) for ln in (fresh / "unit-svc.log").read_text().splitlines()]
    assert [ln["message"] for ln in lines] == ["inside", "from the parent's env", "scoped"]
    first, second, third = lines
    assert first["trace_id"] == f"{s.get_span_context().trace_id:032x}" and first["service"] == "unit-svc"
    assert first["span_id"] == f"{s.get_span_context().span_id:016x}" and isinstance(first["pid"], int)
    assert (second["trace_id"], second["span_id"]) == ("12" * 16, "34" * 8)
    assert second["run_id"] == "manual__2026-11-24" and second["model_version"] == "5"
    assert third["run_id"] == "train-r7"
    stderr = [json.loads(ln) for ln in capsys.readouterr().err.splitlines() if ln.startswith("{")]
    assert stderr[0]["trace_id"] == first["trace_id"] and "service" not in stderr[0]  # the stream format as before


def test_registered_secrets_never_reach_a_log_line(fresh, monkeypatch):
    from tasks.config import load_settings

    monkeypatch.setenv("MLPIPE_GATEWAY_TOKEN", "tok-in-the-tree")
    monkeypatch.setenv("MLPIPE_S3_SECRET_KEY", "s3-key-in-the-tree")
    monkeypatch.setenv("MLPIPE_KAFKA_SASL_PASSWORD", "sasl-in-the-tree")
    found = tracing.secret_values(load_settings())  # what setup_process registers: every secret of the tree
    assert {"tok-in-the-tree", "s3-key-in-the-tree", "sasl-in-the-tree"} <= set(found)
    logs.register_secret("s3cr3t-value-xyz")
    try:
        logs.setup_logging("INFO", "text")
        logging.getLogger("x").warning("connecting with s3cr3t-value-xyz")
        text = "".join(p.read_text() for p in fresh.glob("*.log"))
        assert "s3cr3t-value-xyz" not in text and "connecting with ***" in text
    finally:
        logs._secrets.discard("s3cr3t-value-xyz")


_WRITER = """
import logging, sys
from tasks import logs
logs.set_service("shared")
logs.setup_logging("INFO", "json", stream=open("/dev/null", "w"))
root = logging.getLogger()
root.addHandler(logs.file_handler())
for i in range(int(sys.argv[2])):
    logging.getLogger("w").info("writer %s line %d %s", sys.argv[1], i, "x" * 60)
"""


def test_processes_share_one_rotated_log_file_without_losing_or_mangling_lines(fresh, monkeypatch):
    monkeypatch.setenv("MLPIPE_LOG_FILE_MAX_BYTES", "20000")
    monkeypatch.setenv("MLPIPE_LOG_FILE_BACKUPS", "50")
    n = 600
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(w), str(n)], cwd=ROOT) for w in range(3)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    files = sorted(fresh.glob("shared.log*"))
    assert len(files) > 3 and all(f.stat().st_size <= 20000 for f in files if not f.name.endswith(".lock"))
    seen = set()
    for f in files:
        if f.name.endswith(".lock"):
            continue
        for line in f.read_text().splitlines():
            rec = json.loads(line)  # every line whole
            seen.add(rec["message"].split(" x")[0])
    assert seen == {f"writer {w} line {i}" for w in range(3) for i in range(n)}


def test_lineage_resolves_to_drops_validation_run_and_qc(mlpipe_env, store, capsys):
    from tasks.contracts import layout
    from tasks.steps import registry
    from tasks.tools import lineage
    from tests.support.factories import fake_run

    fake_run(store, "r1", "d1")
    registry.register(store, "digits", "r1", ["d1"], mirror=False)
    registry.record_artifact(store, "digits", 1, layout.QC_REPORT_JSON, {"verdict": "passed"})
    registry.update_version(store, "digits", 1, lambda m: {**m, "qc": {"verdict": "passed", "reasons": []}},
                            event="qc", verdict="passed")
    stored = store.get_json(layout.version_file_key("digits", 1, layout.LINEAGE))
    assert lineage.main(["digits/1", "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["lineage"] == "digits/1" and facts["training_run"]["run_id"] == "r1"
    assert facts["training_run"]["clearml_task_id"] == "offline-123"
    drop = facts["drops"][0]
    assert drop["drop_id"] == "d1" and drop["manifest_sha256"] == stored["drops"][0]["manifest_sha256"]
    assert drop["images_sha256"] == stored["drops"][0]["images_sha256"] and drop["validation"]["success"] is True
    assert facts["qc"]["verdict"]["verdict"] == "passed" and facts["qc"]["report_json"].endswith("qc_report.json")
    assert [e["event"] for e in facts["events"]][:1] == ["register"] and "qc" in [e["event"] for e in facts["events"]]
    assert lineage.main(["digits/1"]) == 0
    text = capsys.readouterr().out
    assert "training run   r1" in text and "drop d1:" in text and stored["drops"][0]["manifest_sha256"] in text
    assert "qc             passed" in text
    # bad input: a clear answer, exit 2
    for bad, says in (("digits", "is not a lineage id"), ("digits/9", "has no version 9"),
                      ("nosuch/1", "has no version 1"), (str(uuid.uuid4()), "no span of frame")):
        assert lineage.main([bad]) == 2, bad
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err, err


def test_an_airflow_step_run_is_a_span_and_the_steps_log_lines_carry_its_trace(fresh, mlpipe_env, monkeypatch):
    from types import SimpleNamespace

    from airflow.sdk.exceptions import AirflowFailException

    from plugins.mlpipe_steps import LocalStepOperator

    monkeypatch.setenv("MLPIPE_LOG_DIR", str(fresh))
    tracing.setup_tracing("airflow", force=True)
    op = LocalStepOperator(task_id="show_drop", command="drops", arguments=["show", "no-such-drop"])
    context = {"ti": SimpleNamespace(dag_id="retrain", task_id="show_drop", try_number=2),
               "dag_run": SimpleNamespace(run_id="manual__2026-11-24T03:47:00")}
    with pytest.raises(AirflowFailException, match="bad input"):
        op.execute(context)
    (step,) = [s for s in tracing.read_spans() if s["name"] == "step drops"]
    assert step["status"] == "error" and step["service"] == "airflow"
    assert step["attributes"]["airflow.run_id"] == "manual__2026-11-24T03:47:00"
    assert step["attributes"]["airflow.try_number"] == 2 and step["attributes"]["airflow.dag_id"] == "retrain"
    lines = [json.loads(ln) for ln in (fresh / "drops.log").read_text().splitlines()]
    error = next(ln for ln in lines if ln["level"] == "ERROR")
    assert error["message"].startswith("error: ") and error["service"] == "drops"
    assert (error["trace_id"], error["span_id"]) == (step["trace_id"], step["span_id"])
