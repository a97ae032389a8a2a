"""One frame traced through the real stack (gateway and consumer processes, Tansu, a Triton in OpenTelemetry
mode), its prediction's lineage, the log folder, and no secret in any log line, span or metric."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tasks.local.procs import free_port, http_ok, wait_until
from tests.support.otlp import OtlpReceiver
from tests.support.stream import ConsumerProcess, digit_images, png

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_a_frame_is_traced_end_to_end_and_no_secret_reaches_a_log_span_or_metric(kafka_cfg, triton_server,
                                                                                  tmp_path):  # noqa: F811
    import httpx

    from tasks.local.triton import LocalTriton

    logdir = tmp_path / "logs"
    secrets = {"MLPIPE_GATEWAY_TOKEN": "tok-" + uuid.uuid4().hex,
               "MLPIPE_S3_ACCESS_KEY": "AKIA" + uuid.uuid4().hex[:16],
               "MLPIPE_S3_SECRET_KEY": "s3-" + uuid.uuid4().hex + uuid.uuid4().hex}
    ours = {"MLPIPE_LOG_DIR": str(logdir), "MLPIPE_KAFKA_TOPIC_PREFIX": kafka_cfg.topic_prefix,
            "MLPIPE_S3_ENDPOINT": "127.0.0.1:9", "MLPIPE_LOG_LEVEL": "INFO", **secrets}
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")} | ours
    auth = {"Authorization": f"Bearer {secrets['MLPIPE_GATEWAY_TOKEN']}"}
    with OtlpReceiver() as rx:
        # a Triton of the test's own in OpenTelemetry mode (what the production flavour runs), exporting to rx
        triton = LocalTriton(triton_server.repo, tmp_path / "triton-logs", backend_dir=triton_server.work / "backends",
                             load_models=["digits"], extra_args=[
                                 "--trace-config=mode=opentelemetry", "--trace-config=rate=1",
                                 "--trace-config=level=TIMESTAMPS",
                                 f"--trace-config=opentelemetry,url={rx.endpoint}/v1/traces",
                                 "--trace-config=opentelemetry,resource=service.name=triton",
                                 "--trace-config=opentelemetry,bsp_schedule_delay=200"])
        triton.start(timeout=60)
        port = free_port()
        gw_log = tmp_path / "gateway.out"
        consumer = ConsumerProcess(kafka_cfg, triton.grpc_url, tmp_path, qdrant_path=tmp_path / "qdrant",
                                   policy="all", env=ours)
        with open(gw_log, "wb") as fh:
            gateway = subprocess.Popen([sys.executable, "-m", "tasks.cli", "gateway", "--port", str(port),
                                        "--bootstrap", kafka_cfg.bootstrap], stdout=fh, stderr=subprocess.STDOUT,
                                       env=env, cwd=ROOT)
        metrics: list[str] = []
        try:
            with triton.client() as c:
                c.wait_model_ready("digits", timeout=60)
            consumer.start()
            base = f"http://127.0.0.1:{port}"
            wait_until(lambda: http_ok(f"{base}/readyz"), 60, "gateway /readyz", alive=lambda: gateway.poll() is None)
            consumer.wait_ready(60)
            body = png(digit_images(1)[0])
            ok = [httpx.post(f"{base}/v1/frames", content=body, timeout=15,
                             headers={**auth, "Content-Type": "image/png", "X-Device-Id": f"cam-{i}"})
                  for i in range(3)]
            assert [r.status_code for r in ok] == [202] * 3, [r.text for r in ok]
            # bad auth: none, a wrong token that is another secret, and the token in the query string
            assert httpx.post(f"{base}/v1/frames", content=body,
                              headers={"Content-Type": "image/png"}).status_code == 401
            assert httpx.post(f"{base}/v1/frames", content=body, headers={
                "Authorization": f"Bearer {secrets['MLPIPE_S3_SECRET_KEY']}", "Content-Type": "image/png"}
            ).status_code == 401
            assert httpx.post(f"{base}/v1/frames?token={secrets['MLPIPE_GATEWAY_TOKEN']}", content=body,
                              headers={**auth, "Content-Type": "image/png"}).status_code == 400
            fid = ok[0].json()["frame_id"]

            def done() -> dict | None:
                r = httpx.get(f"{base}/v1/frames/{fid}", headers=auth, timeout=5)
                return r.json() if r.status_code == 200 and r.json().get("status") == "done" else None

            wait_until(lambda: done() is not None, 60, "prediction of the first frame")
            pred = done()
            metrics += [httpx.get(f"{base}/metrics").text, consumer.get("/metrics")[1]]
        finally:
            gateway.terminate()
            gateway.wait(timeout=20)
            code, _secs = consumer.terminate()
            triton.stop()
        assert code == 0, consumer.log()
        assert pred["model_version"] == "1" and pred["lineage"] == "digits/1"
        triton_spans = [s for svc, s in rx.spans() if svc == "triton"]

    # mlpipe trace: gateway -> Kafka -> consumer batch -> Triton -> sinks, in time order
    out = subprocess.run([sys.executable, "-m", "tasks.cli", "trace", fid], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith(f"frame {fid} (trace ") and "lineage digits/1" in lines[0], out.stdout
    order = ["POST /v1/frames", "frames publish", "consumer batch", "triton infer", "kafka produce", "qdrant upsert"]
    pos = [next((i for i, ln in enumerate(lines) if name in ln), -1) for name in order]
    assert -1 not in pos and pos == sorted(pos), out.stdout
    assert "gateway" in lines[pos[1]] and "stream" in lines[pos[2]] and "model digits v1" in lines[pos[2]]

    # Triton continued the trace it got as gRPC metadata: its request span is a child of "triton infer"
    spans = [json.loads(ln) for f in sorted(logdir.glob("spans.jsonl*")) if not f.name.endswith(".lock")
             for ln in f.read_text().splitlines()]
    infers = {(s["trace_id"], s["span_id"]) for s in spans if s["name"] == "triton infer"}
    assert triton_spans, f"Triton exported no span; its log:\n{triton.log_path.read_text()[-2000:]}"
    assert any((s.trace_id.hex(), s.parent_span_id.hex()) in infers for s in triton_spans), \
        [(s.name, s.trace_id.hex(), s.parent_span_id.hex()) for s in triton_spans][:5]

    # the log folder: one JSON-lines file per service, with the trace ids and the served model version
    logs = {f.name: [json.loads(ln) for ln in f.read_text().splitlines()] for f in logdir.glob("*.log")}
    assert {"gateway.log", "stream.log"} <= set(logs), sorted(logs)
    refused = [ln for ln in logs["gateway.log"] if "unauthorized" in ln["message"]]
    assert refused and refused[0]["service"] == "gateway" and len(refused[0].get("trace_id", "")) == 32
    assert refused[0]["trace_id"] in {s["trace_id"] for s in spans}
    assert any(ln.get("model_version") == "1" for ln in logs["stream.log"]), logs["stream.log"][-3:]

    # no secret anywhere: every file of the log folder, the processes' own output, /metrics of both services
    texts = {str(f): f.read_bytes().decode("utf-8", "replace") for f in logdir.rglob("*") if f.is_file()}
    texts.update({str(gw_log): gw_log.read_text(errors="replace"), "consumer": consumer.log(100000),
                  "gateway /metrics": metrics[0], "consumer /metrics": metrics[1]})
    for name, value in secrets.items():
        leaks = [where for where, text in texts.items() if value in text]
        assert not leaks, f"{name} found in {leaks}"
    assert len(texts) >= 6
    queried = [s for s in spans if (s["attributes"].get("url.query") or "").startswith("token=")]
    assert queried and queried[0]["attributes"]["url.query"] == "token=REDACTED"  # the request was traced, redacted
