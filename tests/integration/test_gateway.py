"""The ingest gateway against a real broker (and, for GET, the real consumer and Triton)."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

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
        (png(img), {**AUTH, "Content-Type": "text/plain"}, 415, "unsupported_content_type"),
        (b"\xff\xd8\xff\xe0" + b"\x00" * 100, {**AUTH, "Content-Type": "image/jpeg"}, 415,
         "unsupported_content_type"),  # digits takes PNG and raw frames only
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
        # the gateway makes only the cheap checks: a PNG of another size is queued, Triton finds it
        wrong = client.post("/v1/frames", content=png(np.zeros((32, 32), np.uint8)),
                            headers={**AUTH, "Content-Type": "image/png"})
        assert wrong.status_code == 202, wrong.text
        pending = client.get(f"/v1/frames/{fid}", headers=AUTH)
        assert pending.status_code == 202 and pending.json() == {"frame_id": fid, "status": "pending"}
        consumer = ConsumerProcess(kafka_cfg, triton_server.grpc_url, tmp_path, policy="none").start()
        try:
            def answered() -> bool:
                return client.get(f"/v1/frames/{fid}", headers=AUTH).status_code == 200
            wait_until(answered, 40, "prediction via the gateway", interval=0.2, alive=consumer.proc.alive)
            pred = client.get(f"/v1/frames/{fid}", headers=AUTH).json()
            wrong_id = wrong.json()["frame_id"]
            wait_until(lambda: client.get(f"/v1/frames/{wrong_id}", headers=AUTH).json().get("status") == "failed",
                       20, "the dead letter via the gateway", interval=0.2, alive=consumer.proc.alive)
            failed = client.get(f"/v1/frames/{wrong_id}", headers=AUTH).json()
        finally:
            code, _ = consumer.terminate()
        assert code == 0, consumer.log()
    assert pred["status"] == "done" and pred["frame_id"] == fid
    assert 0 <= pred["label"] <= 9 and len(pred["topk"]) == 3 and pred["device_id"] == "cam-9"
    assert pred["class"] == str(pred["label"])
    assert failed["reason"] == "wrong_shape" and failed["detail"] == "image is 32x32, expected 28x28"
    assert pred["model_name"] == "digits" and pred["model_version"] == "1"


def test_broker_down_answers_503(tmp_path):
    from fastapi.testclient import TestClient

    cfg = KafkaConfig(bootstrap=f"127.0.0.1:{free_port()}")
    app = create_app(cfg, GatewaySettings(token=TOKEN, produce_timeout_s=1.0, create_topics=False,
                                          follow_predictions=False))
    with TestClient(app) as client:
        t0 = time.monotonic()
        r = client.post("/v1/frames", content=png(digit_images(1)[0]), headers={**AUTH, "Content-Type": "image/png"})
        took = time.monotonic() - t0
    assert r.status_code == 503 and r.json()["detail"]["reason"] == "bus_unavailable"
    assert r.headers["retry-after"] == "1"
    assert took < 4.0, took  # bounded by produce_timeout_s (+1 s of slack for the delivery report)


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
    # a model without a spec: the same one-line error, naming the models there are
    out = subprocess.run([sys.executable, "-m", "tasks.cli", "gateway", "--port", str(port), "--model", "nope"],
                         env={**env, "MLPIPE_GATEWAY_TOKEN": TOKEN}, capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and out.stderr.startswith("error: ") and "no model spec for 'nope'" in out.stderr
    assert "digits" in out.stderr and "Traceback" not in out.stderr


# --------------------------------------------------------------------------- limits, against the real server


@contextlib.contextmanager
def _gateway(broker, tmp_path, *extra_args: str, **env_vars: str):
    """``mlpipe gateway`` as a process on a free port: (base URL, port, Popen, log path)."""
    port = free_port()
    env = {**os.environ, "MLPIPE_GATEWAY_TOKEN": TOKEN, "MLPIPE_KAFKA_TOPIC_PREFIX": f"lim{uuid.uuid4().hex[:6]}.",
           **env_vars}
    log = tmp_path / f"gateway-{port}.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "tasks.cli", "gateway", "--port", str(port), "--bootstrap",
                                 broker.bootstrap, *extra_args], stdout=fh, stderr=subprocess.STDOUT, env=env)
    try:
        wait_until(lambda: http_ok(f"http://127.0.0.1:{port}/healthz"), 30, "gateway /healthz",
                   alive=lambda: proc.poll() is None)
        yield f"http://127.0.0.1:{port}", port, proc, log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def _raw(port: int, *parts: bytes, pause: float = 0.0, timeout: float = 10.0,
         to_close: bool = False) -> tuple[bytes, float]:
    """Send ``parts`` on one connection (``pause`` s apart, from a thread) while reading what comes back:
    (everything read until the server closed, seconds from the first byte sent to the first byte back, or
    to the close when nothing came back or with ``to_close``)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    stop = threading.Event()

    def send() -> None:
        for i, part in enumerate(parts):
            if stop.is_set() or (i and pause and stop.wait(pause)):
                return
            try:
                s.sendall(part)
            except OSError:
                return

    t0 = time.monotonic()
    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    got: list[bytes] = []
    first = None
    try:
        while True:
            try:
                chunk = s.recv(65536)
            except OSError:  # a timeout too
                break
            if not chunk:
                break
            first = first if first is not None else time.monotonic() - t0
            got.append(chunk)
    finally:
        stop.set()
        sender.join(timeout=5)
        s.close()
    closed = time.monotonic() - t0
    return b"".join(got), closed if (to_close or first is None) else first


def _status(response: bytes) -> int:
    m = re.match(rb"HTTP/1\.1 (\d{3}) ", response)
    return int(m.group(1)) if m else 0


MB_HEADER = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * (1 << 20) + b"\r\n\r\n"


def test_header_limits_answer_431_fast_and_memory_stays_bounded(broker, tmp_path):
    import httpx
    import psutil

    with _gateway(broker, tmp_path) as (base, port, proc, log):
        body, took = _raw(port, MB_HEADER)
        assert _status(body) == 431 and b"headers_too_large" in body, body[:200]
        assert took < 1.0, took
        # an ordinary client reads the 431 too (the connection is drained, not reset)
        r = httpx.get(f"{base}/healthz", headers={"X-Big": "a" * (1 << 20)}, timeout=10)
        assert r.status_code == 431 and r.json()["detail"]["reason"] == "headers_too_large"
        r = httpx.get(f"{base}/healthz", headers={f"X-H{i}": "1" for i in range(150)}, timeout=10)
        assert r.status_code == 431 and r.json()["detail"]["reason"] == "too_many_headers"

        ps = psutil.Process(proc.pid)
        before = ps.memory_info().rss
        peak = [before]
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], ps.memory_info().rss)
                time.sleep(0.01)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t0 = time.monotonic()
        with ThreadPoolExecutor(max_workers=10) as pool:  # 50 requests of 1 MiB headers, 10 at a time
            results = list(pool.map(lambda _: _raw(port, MB_HEADER), range(50)))
        flood_s = time.monotonic() - t0
        stop.set()
        sampler.join()
        after = ps.memory_info().rss
        statuses = [_status(b) for b, _ in results]
        slowest = max(t for _, t in results)
        growth_mib, peak_mib = (after - before) / 2**20, (peak[0] - before) / 2**20
        print(f"\n1 MiB header -> 431 in {took * 1000:.1f} ms; flood of 50: {flood_s:.2f}s, slowest "
              f"{slowest * 1000:.0f} ms, RSS {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB (growth "
              f"{growth_mib:+.1f} MiB, peak {peak_mib:+.1f} MiB)")
        assert statuses == [431] * 50, statuses
        assert peak_mib < 16, (growth_mib, peak_mib)
        # 20 headers of 16 MiB, 10 at a time: the server drains (discards) at most 8 MiB of each, never
        # buffers them (uvicorn with httptools peaked at +86 MiB with 50 of these at once, answering in 4 s)
        huge = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (16 << 20) + b"\r\n\r\n"
        peak[0], stop = ps.memory_info().rss, threading.Event()
        base_rss = peak[0]
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        with ThreadPoolExecutor(max_workers=10) as pool:
            huge_results = list(pool.map(lambda _: _raw(port, huge, to_close=True), range(20)))
        stop.set()
        sampler.join()
        huge_peak = (peak[0] - base_rss) / 2**20
        huge_slowest = max(t for _, t in huge_results)
        print(f"20 x 16 MiB headers: slowest close {huge_slowest * 1000:.0f} ms, RSS peak {huge_peak:+.1f} MiB, "
              f"{sum(_status(b) == 431 for b, _ in huge_results)}/20 read the 431 (the others: reset)")
        assert huge_peak < 16 and huge_slowest < 3.5, (huge_peak, huge_slowest)
        assert httpx.get(f"{base}/healthz").status_code == 200
        assert 'reason="headers_too_large"} 72.0' in httpx.get(f"{base}/metrics").text
        text = log.read_text()  # 72 refusals, one log line (the next may come 10 s later)
        assert text.count("request refused (headers_too_large)") == 1 and "Invalid HTTP request" not in text


def test_body_limit_stops_reading_at_the_frame_limit(broker, tmp_path):
    auth = f"Authorization: Bearer {TOKEN}\r\n".encode()
    with _gateway(broker, tmp_path, "--max-frame-bytes", "4096") as (base, port, _proc, _log):
        # a declared length over the limit: 413 at once, the body is never sent
        body, took = _raw(port, b"POST /v1/frames HTTP/1.1\r\nHost: x\r\n" + auth +
                          b"Content-Type: image/png\r\nContent-Length: 104857600\r\n\r\n")
        assert _status(body) == 413 and b"oversize" in body and took < 3.5, (body[:300], took)
        # a chunked body: 413 as soon as limit + 1 bytes arrived, although the client never finishes it
        head = (b"POST /v1/frames HTTP/1.1\r\nHost: x\r\n" + auth +
                b"Content-Type: image/png\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"%x\r\n%s\r\n" % (4097, b"\x89" * 4097)
        t0 = time.monotonic()
        body, _ = _raw(port, head, chunk, timeout=5)
        took = time.monotonic() - t0
        assert _status(body) == 413 and b"oversize" in body, body[:300]
        assert b"connection: close" in body.lower() and took < 3.5, took  # not the 10 s body timeout
        # a body at the limit is read (and refused only as not an image)
        r = __import__("httpx").post(f"{base}/v1/frames", content=b"x" * 4096,
                                     headers={**AUTH, "Content-Type": "image/png"}, timeout=10)
        assert r.status_code == 422, r.text


def test_slow_requests_time_out(broker, tmp_path):
    auth = f"Authorization: Bearer {TOKEN}\r\n".encode()
    with _gateway(broker, tmp_path, MLPIPE_GATEWAY_HEADER_TIMEOUT_S="1", MLPIPE_GATEWAY_BODY_TIMEOUT_S="1",
                  MLPIPE_GATEWAY_KEEP_ALIVE_S="1") as (base, port, _proc, _log):
        # slowloris: a header line every 0.2 s never completes the request -> 408 about 1 s after the first byte
        body, took = _raw(port, b"GET /healthz HTTP/1.1\r\n", *[b"X-Slow-%d: 1\r\n" % i for i in range(40)],
                          pause=0.2)
        assert _status(body) == 408 and b"request_timeout" in body and 0.8 < took < 2.5, (body[:200], took)
        # a connection that sends nothing is closed after the same time
        body, took = _raw(port)
        assert body == b"" and 0.8 < took < 2.5, took
        # a body that stops arriving: 408 after the body timeout
        body, took = _raw(port, b"POST /v1/frames HTTP/1.1\r\nHost: x\r\n" + auth +
                          b"Content-Type: application/x-raw-uint8\r\nContent-Length: 784\r\n\r\n" + b"\x00" * 10)
        assert _status(body) == 408 and b"request_timeout" in body and 0.8 < took < 3.0, (body[:200], took)
        # an idle keep-alive connection is closed after MLPIPE_GATEWAY_KEEP_ALIVE_S
        body, took = _raw(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", to_close=True)
        assert _status(body) == 200 and 0.8 < took < 2.5, took
        # ... also when the rest of a body nobody reads (a 401) arrives after the answer
        body, took = _raw(port, b"POST /v1/frames HTTP/1.1\r\nHost: x\r\nContent-Length: 784\r\n\r\n" + b"\x00" * 100,
                          b"\x00" * 684, pause=0.3, to_close=True)
        assert _status(body) == 401 and 1.1 < took < 2.8, (body[:100], took)
        import httpx

        rejected = httpx.get(f"{base}/readyz").json()["rejected"]
        assert rejected.get("request_timeout", 0) >= 2, rejected


def test_rate_limit_and_quota_per_token(broker, tmp_path):
    import httpx

    with _gateway(broker, tmp_path, MLPIPE_GATEWAY_RATE_PER_S="2", MLPIPE_GATEWAY_RATE_BURST="3",
                  MLPIPE_GATEWAY_QUOTA="4", MLPIPE_GATEWAY_QUOTA_WINDOW_S="3600") as (base, _port, _proc, log):
        frame = png(digit_images(1)[0])
        with httpx.Client(base_url=base, timeout=15) as c:
            for _ in range(10):  # unauthenticated: 401, and nothing of the token's budget is used
                assert c.post("/v1/frames", content=frame, headers={"Content-Type": "image/png"}).status_code == 401
            assert [c.get(f"/v1/frames/{uuid.uuid4()}", headers=AUTH).status_code for _ in range(3)] == [404] * 3
            r = c.get(f"/v1/frames/{uuid.uuid4()}", headers=AUTH)
            assert r.status_code == 429 and r.headers["retry-after"] == "1", r.text
            assert r.json()["detail"]["reason"] == "rate_limited" and r.json()["detail"]["limit"] == "rate"
            time.sleep(1.6)  # 3 tokens back
            post = {**AUTH, "Content-Type": "image/png"}
            assert [c.post("/v1/frames", content=frame, headers=post).status_code for _ in range(3)] == [202] * 3
            time.sleep(0.6)
            assert c.post("/v1/frames", content=frame, headers=post).status_code == 202  # 4 of 4
            time.sleep(0.6)
            r = c.post("/v1/frames", content=frame, headers=post)
            assert r.status_code == 429 and r.json()["detail"]["limit"] == "quota", r.text
            assert r.json()["detail"]["reason"] == "quota_exceeded"
            assert 3590 <= int(r.headers["retry-after"]) <= 3600
            metrics = c.get("/metrics").text
        assert 'reason="rate_limited"} 1.0' in metrics and 'reason="quota_exceeded"} 1.0' in metrics
        assert 'reason="unauthorized"} 10.0' in metrics
    text = log.read_text()
    assert "request refused (rate_limited)" in text and "request refused (quota_exceeded)" in text
    assert TOKEN not in text


def test_token_in_the_query_string_is_refused_and_never_logged(broker, tmp_path):
    import httpx

    secret = "SECRET" + uuid.uuid4().hex
    with _gateway(broker, tmp_path, "--log-level", "debug") as (base, _port, _proc, log):
        for url in (f"/v1/frames/{uuid.uuid4()}?token={secret}", f"/v1/frames?access_token={secret}",
                    f"/healthz?token={secret}", f"/v1/frames/{uuid.uuid4()}?x=1&%74oken={secret}"):
            r = httpx.request("POST" if url.startswith("/v1/frames?") else "GET", base + url, timeout=10)
            assert r.status_code == 400, (url, r.text)
            assert r.json()["detail"]["reason"] == "credentials_in_query"
            assert "Authorization" in r.json()["detail"]["message"] and secret not in r.text
        assert httpx.get(f"{base}/readyz").json()["rejected"]["credentials_in_query"] == 4
    text = log.read_text()
    assert '?[REDACTED] HTTP/1.1" 400' in text  # the access log line is there, without the query
    assert secret not in text
