"""A real Prometheus (Debian's binary, run by ``mlpipe prometheus serve`` as ``make up`` runs it) scraping a
running metrics exporter and a running tritonserver, queried through its HTTP API (``/api/v1/query``).

* the exporter measures the consumer group's lag from outside (real Tansu broker, offsets committed by a
  group member that then left) and Prometheus sees that number;
* the exporter serves the drift report of the store; the rule ``MlpipeDriftDetected`` (the real
  ops/prometheus/rules, evaluated every second here) fires in Prometheus;
* Triton's metrics port is scraped (``up{job="triton"}`` 1 and its ``nv_inference_*`` series), and the
  Triton metric names the rules and the dashboard use are ones this tritonserver exports.

Skips, with the install command, only where the prometheus binary is not installed."""

from __future__ import annotations

import json
import sys
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest

from tasks.contracts import layout
from tasks.local.procs import ManagedProcess, free_port, http_ok, wait_until

ROOT = Path(__file__).resolve().parents[2]


def _query(base: str, promql: str) -> list[dict]:
    url = f"{base}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
    with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 - loopback
        body = json.loads(resp.read())
    assert body["status"] == "success", body
    return body["data"]["result"]


def _until(base: str, promql: str, check, timeout: float = 45.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    result: list[dict] = []
    while time.monotonic() < deadline:
        result = _query(base, promql)
        if check(result):
            return result
        time.sleep(0.5)
    raise AssertionError(f"{promql}: {result} after {timeout:.0f}s")


def _commit(kafka_cfg, group: str, partition: int, offset: int) -> None:
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer(kafka_cfg.consumer_config(group))
    try:
        c.commit(offsets=[TopicPartition(kafka_cfg.frames_topic, partition, offset)], asynchronous=False)
    finally:
        c.close()


@pytest.fixture
def prometheus_bin():
    from tasks.local.prometheus import available

    why = available()
    if why:
        pytest.skip(f"prometheus cannot run here: {why}")


def test_prometheus_scrapes_the_exporter_and_triton_and_evaluates_the_rules(
        prometheus_bin, broker, kafka_cfg, store, triton_server, tmp_path):
    from confluent_kafka import Producer

    from tasks.serving import exporter as ex

    # 30 frames on partition 0, 12 of them committed by the group: a lag of 18 seen from outside
    producer = Producer({"bootstrap.servers": kafka_cfg.bootstrap})
    for i in range(30):
        producer.produce(kafka_cfg.frames_topic, b"frame", partition=0)
    assert producer.flush(10) == 0
    group = f"g-{uuid.uuid4().hex[:8]}"
    _commit(kafka_cfg, group, 0, 12)
    store.put_json(layout.MONITOR_LATEST, {"model": "digits", "champion": 3, "status": "drift", "drift": True,
                                           "samples": 500, "created_at": "2026-11-24T03:47:00+00:00",
                                           "checks": [{"name": "class_psi", "value": 0.9, "threshold": 0.25,
                                                       "status": "drift", "drift": True}]})
    pids = tmp_path / "pids"
    pids.mkdir()
    (pids / "triton.pid").write_text(f"{triton_server.triton.pid}\n")  # type: ignore[attr-defined]
    exporter = ex.build(store, ["digits"], kafka_cfg, group, pids, cost_window=60, sample_interval=0.5).start()
    triton_metrics = triton_server.triton.metrics_url  # type: ignore[attr-defined]
    port = free_port()
    prom = ManagedProcess("prometheus", [
        sys.executable, "-m", "tasks.cli", "prometheus", "serve", "--dir", str(tmp_path / "prom"), "--port", str(port),
        f"--target=exporter=127.0.0.1:{exporter.port}",
        f"--target=triton={urllib.parse.urlsplit(triton_metrics).netloc}",
        "--scrape-interval", "1s", "--evaluation-interval", "1s"], tmp_path / "prometheus.log", cwd=ROOT).start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: http_ok(f"{base}/-/ready"), 30, "prometheus ready", interval=0.2, alive=prom.alive)
        # the lag measured outside the consumer, as Prometheus stored it
        lag = _until(base, f'mlpipe_kafka_group_lag_total_messages{{group="{group}"}}',
                     lambda r: r and float(r[0]["value"][1]) == 18)
        assert lag[0]["metric"]["job"] == "exporter" and lag[0]["metric"]["topic"] == kafka_cfg.frames_topic
        # the drift result of a batch step, as a series, and the alert rule on it firing
        _until(base, 'mlpipe_drift_check_value{model="digits",check="class_psi"}',
               lambda r: r and float(r[0]["value"][1]) == 0.9)
        alerts = _until(base, 'ALERTS{alertname="MlpipeDriftDetected",alertstate="firing"}', lambda r: bool(r))
        assert alerts[0]["metric"]["model"] == "digits" and alerts[0]["metric"]["severity"] == "warning"
        assert not _query(base, 'ALERTS{alertname="MlpipeConsumerLagHigh"}')  # 18 frames is no alert
        # the cost series: CPU seconds of the process of each pid file (and of the exporter itself)
        for service in ("triton", "exporter"):
            _until(base, f'mlpipe_service_cpu_seconds_total{{service="{service}"}}',
                   lambda r: r and float(r[0]["value"][1]) > 0)
        # Triton's metrics port, scraped
        _until(base, 'up{job="triton"}', lambda r: r and r[0]["value"][1] == "1")
        _until(base, 'nv_inference_request_success{job="triton",model="digits"}', lambda r: bool(r))
        # moving the committed offset changes what Prometheus sees within a few scrapes
        _commit(kafka_cfg, group, 0, 30)
        _until(base, f'mlpipe_kafka_group_lag_total_messages{{group="{group}"}}',
               lambda r: r and float(r[0]["value"][1]) == 0)
        # the rules loaded are the repository's
        with urllib.request.urlopen(f"{base}/api/v1/rules", timeout=5) as resp:  # noqa: S310
            groups = {g["name"] for g in json.loads(resp.read())["data"]["groups"]}
        assert groups == {"mlpipe.recording", "mlpipe.alerts"}
    finally:
        prom.stop(timeout=10)
        exporter.stop()
    assert prom.proc is not None and prom.proc.returncode == 0, prom.log_tail()
    # the Triton names the rules and the dashboard use are ones this tritonserver really exports
    from tests.static.test_prometheus_rules import TRITON_METRICS

    with urllib.request.urlopen(triton_metrics, timeout=5) as resp:  # noqa: S310
        text = resp.read().decode()
    exported = {line.split("{", 1)[0].split(" ", 1)[0] for line in text.splitlines() if line.startswith("nv_")}
    assert TRITON_METRICS <= exported, sorted(TRITON_METRICS - exported)
