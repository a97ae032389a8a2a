"""The ingest gateway against a real broker (and, for GET, the real consumer and Triton)."""

from __future__ import annotations

import datetime as dt
import os
import re
import subprocess
import sys
import uuid

import numpy as np
import pytest

from tasks.adapters.kafka import KafkaConfig
from tasks.serving.gateway import GatewaySettings, create_app
from tasks.local.procs import free_port, http_ok, wait_until
from tests.support.stream import ConsumerProcess, digit_images, png, read_topic


pytestmark = [pytest.mark.integration,
              pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")]

TOKEN = "tok-" + uuid.uuid4().hex
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def client(kafka_cfg):  # noqa: F811
    from fastapi.testclient import TestClient

    app = create_app(kafka_cfg, GatewaySettings(token=TOKEN, max_frame_bytes=4096))
    with TestClient(app) as c:
        yield c


def _frames(cfg: KafkaConfig, n: int, timeout: float = 10.0):
    return read_topic(cfg, cfg.frames_topic, lambda r: len(r) >= n, timeout=timeout)


def test_post_frame_is_queued_with_contract_headers(client, kafka_cfg):  # noqa: F811
    img = digit_images(1)[0]
    body = png(img)
    r = client.post("/v1/frames", content=body, headers={**AUTH, "Content-Type": "image/png",
                                                          "X-Device-Id": "cam-7",
                                                          "traceparent": "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"})
    assert r.status_code == 202, r.text
    fid = r.json()["frame_id"]
    assert str(uuid.UUID(fid)) == fid and r.headers["location"] == f"/v1/frames/{fid}"
    raw = client.post("/v1/frames", content=img.tobytes(),
                      headers={**AUTH, "Content-Type": "application/x-raw-uint8", "X-Device-Id": "cam-8",
                               "X-Captured-At": "2026-01-02T03:04:05Z"})
    assert raw.status_code == 202, raw.text
    multi = client.post("/v1/frames", files={"file": ("d.png", body, "image/png")}, headers=AUTH)
    assert multi.status_code == 202, multi.text

    recs = {r.header("frame_id"): r for r in _frames(kafka_cfg, 3)}
    assert set(recs) == {fid, raw.json()["frame_id"], multi.json()["frame_id"]}
    first = recs[fid]
    assert first.key == b"cam-7" and first.value == body
    assert first.header("content-type") == "image/png"
    captured = dt.datetime.fromisoformat(first.header("captured_at").replace("Z", "+00:00"))
    assert abs((dt.datetime.now(dt.timezone.utc) - captured).total_seconds()) < 60
    tp = first.header("traceparent")
    assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-01", tp) and tp.split("-")[1] == "ab" * 16  # trace continued
    second = recs[raw.json()["frame_id"]]
    assert second.header("content-type") == "application/x-raw-uint8" and second.value == img.tobytes()
    assert second.header("captured_at").startswith("2026-01-02T03:04:05")
    third = recs[multi.json()["frame_id"]]
    assert third.key == b"anonymous" and third.value == body
    assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-01", third.header("traceparent"))


def test_bad_requests_get_clear_4xx_and_are_not_queued(client, kafka_cfg):  # noqa: F811
    img = digit_images(1)[0]
    h = {**AUTH, "Content-Type": "image/png"}
    cases = [
        (b"this is not an image", h, 422, "undecodable"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 5000, h, 413, "oversize"),
        (png(np.zeros((32, 32), np.uint8)), h, 422, "wrong_shape"),
        (png(img), {**AUTH, "Content-Type": "text/plain"}, 415, "unsupported_content_type"),
        (b"\x00" * 700, {**AUTH, "Content-Type": "application/x-raw-uint8"}, 422, "wrong_shape"),
        (b"", h, 422, "empty"),
        (png(img), {**h, "X-Device-Id": "bad device id!"}, 422, "invalid_device_id"),
        (png(img), {**h, "X-Captured-At": "yesterday"}, 422, "invalid_captured_at"),
    ]
    for body, headers, status, reason in cases:
        r = client.post("/v1/frames", content=body, headers=headers)
        assert r.status_code == status, (reason, r.status_code, r.text)
        assert r.json()["detail"]["reason"] == reason and r.json()["detail"]["message"]
    r = client.post("/v1/frames", files={"nofile": ("d.png", png(img), "image/png")}, headers=AUTH)
    assert r.status_code == 422 and r.json()["detail"]["reason"] == "missing_file"
    # authentication
    r = client.post("/v1/frames", content=png(img), headers={"Content-Type": "image/png"})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert "missing" in r.json()["detail"]["message"]
    r = client.post("/v1/frames", content=png(img), headers={"Content-Type": "image/png",
                                                              "Authorization": "Bearer wrong-token"})
    assert r.status_code == 401 and "invalid" in r.json()["detail"]["message"]
    assert client.get(f"/v1/frames/{uuid.uuid4()}").status_code == 401
    # one good frame: it is the only message on the topic
    ok = client.post("/v1/frames", content=png(img), headers=h)
    assert ok.status_code == 202
    recs = read_topic(kafka_cfg, kafka_cfg.frames_topic, lambda r: len(r) >= 1, timeout=10, settle=1.0)
    assert [r.header("frame_id") for r in recs] == [ok.json()["frame_id"]]


def test_openapi_docs_health_and_unknown_ids(client):
    spec = client.get("/openapi.json")
    assert spec.status_code == 200
    doc = spec.json()
    assert "/v1/frames" in doc["paths"] and "/v1/frames/{frame_id}" in doc["paths"]
    assert "image/png" in doc["paths"]["/v1/frames"]["post"]["requestBody"]["content"]
    assert any(s.get("scheme") == "bearer" for s in doc["components"]["securitySchemes"].values())
    assert client.get("/docs").status_code == 200
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get(f"/v1/frames/{uuid.uuid4()}", headers=AUTH).status_code == 404
    assert client.get("/v1/frames/not-a-uuid", headers=AUTH).status_code == 404


def test_get_is_pending_then_returns_the_prediction(kafka_cfg, triton_server, tmp_path):  # noqa: F811
    from fastapi.testclient import TestClient

    app = create_app(kafka_cfg, GatewaySettings(token=TOKEN))
    with TestClient(app) as client:
        r = client.post("/v1/frames", content=png(digit_images(1)[0]),
                        headers={**AUTH, "Content-Type": "image/png", "X-Device-Id": "cam-9"})
        assert r.status_code == 202
        fid = r.json()["frame_id"]
        pending = client.get(f"/v1/frames/{fid}", headers=AUTH)
        assert pending.status_code == 202 and pending.json() == {"frame_id": fid, "status": "pending"}
        consumer = ConsumerProcess(kafka_cfg, triton_server.grpc_url, tmp_path, policy="none").start()
        try:
            def answered() -> bool:
                return client.get(f"/v1/frames/{fid}", headers=AUTH).status_code == 200
            wait_until(answered, 40, "prediction via the gateway", interval=0.2, alive=consumer.proc.alive)
            pred = client.get(f"/v1/frames/{fid}", headers=AUTH).json()
        finally:
            code, _ = consumer.terminate()
        assert code == 0, consumer.log()
    assert pred["status"] == "done" and pred["frame_id"] == fid
    assert 0 <= pred["label"] <= 9 and len(pred["topk"]) == 3 and pred["device_id"] == "cam-9"
    assert pred["model_name"] == "digits" and pred["model_version"] == "1"


def test_broker_down_answers_503(tmp_path):
    from fastapi.testclient import TestClient

    cfg = KafkaConfig(bootstrap=f"127.0.0.1:{free_port()}")
    app = create_app(cfg, GatewaySettings(token=TOKEN, produce_timeout_s=1.0, create_topics=False,
                                          follow_predictions=False))
    with TestClient(app) as client:
        r = client.post("/v1/frames", content=png(digit_images(1)[0]), headers={**AUTH, "Content-Type": "image/png"})
    assert r.status_code == 503 and r.json()["detail"]["reason"] == "bus_unavailable"
    assert r.headers["retry-after"] == "1"


def test_cli_runs_uvicorn_and_never_logs_the_token(broker, tmp_path):  # noqa: F811
    import httpx

    port = free_port()
    env = {**os.environ, "MLPIPE_GATEWAY_TOKEN": TOKEN, "MLPIPE_KAFKA_TOPIC_PREFIX": f"cli{uuid.uuid4().hex[:6]}."}
    log = tmp_path / "gateway.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "tasks.cli", "gateway", "--port", str(port), "--bootstrap",
                                 broker.bootstrap, "--log-level", "debug"], stdout=fh, stderr=subprocess.STDOUT,
                                env=env)
    try:
        wait_until(lambda: http_ok(f"http://127.0.0.1:{port}/healthz"), 30, "gateway /healthz",
                   alive=lambda: proc.poll() is None)
        base = f"http://127.0.0.1:{port}"
        assert httpx.post(f"{base}/v1/frames", content=png(digit_images(1)[0]),
                          headers={"Content-Type": "image/png"}).status_code == 401
        ok = httpx.post(f"{base}/v1/frames", content=png(digit_images(1)[0]),
                        headers={"Content-Type": "image/png", **AUTH}, timeout=15)
        assert ok.status_code == 202
        assert httpx.get(f"{base}/openapi.json").status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=15)
    text = log.read_text()
    assert "Uvicorn running on http://127.0.0.1" in text
    assert TOKEN not in text
    # without a token configured the CLI refuses to start, with a one-line error
    env.pop("MLPIPE_GATEWAY_TOKEN")
    out = subprocess.run([sys.executable, "-m", "tasks.cli", "gateway", "--port", str(port)], env=env,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and out.stderr.startswith("error: MLPIPE_GATEWAY_TOKEN") and "Traceback" not in out.stderr
