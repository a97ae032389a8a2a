"""The metrics exporter: drift and QC from the store, lag from offsets, cost per frame, a source that fails alone.

The report and the QC verdicts are written by the real code (``tasks.steps.monitor.compare``, the registry)
so a change of their format shows up here; no broker (a bootstrap nobody listens on)."""

from __future__ import annotations

import datetime as dt
import time

import numpy as np
import pytest

from tasks.contracts import layout
from tasks.serving import exporter as ex


def _samples(families) -> dict[tuple[str, frozenset], float]:
    out = {}
    for family in families:
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def _drift_report(drifted: bool) -> dict:
    from tasks.config import load_settings
    from tasks.steps.monitor import LiveWindow, Reference, Thresholds, compare

    spec = load_settings().model_spec("digits")
    rng = np.random.default_rng(0)
    n = 400
    ref_labels = rng.integers(0, 10, n)
    live_labels = np.full(n, 3) if drifted else rng.integers(0, 10, n)
    emb = rng.normal(size=(n, 8)).astype(np.float32)
    ref = Reference("digits", 2, "test", ref_labels, rng.uniform(0.9, 1.0, n), emb, ref_labels)
    live = LiveWindow("kafka", live_labels, rng.uniform(0.9, 1.0, n), emb.copy(), {"2": n}, None, None)
    result = compare(ref, live, Thresholds.for_spec(spec), spec)
    return {"model": "digits", "champion": 2, "created_at": "2026-11-24T03:47:00+00:00", **result}


@pytest.mark.parametrize("drifted", [True, False])
def test_drift_report_becomes_gauges(drifted):
    report = _drift_report(drifted)
    s = _samples(ex.drift_families(report))
    assert s[("mlpipe_drift_detected", frozenset({("model", "digits")}))] == (1.0 if drifted else 0.0)
    status = "drift" if drifted else "ok"
    assert s[("mlpipe_drift_status", frozenset({("model", "digits"), ("status", status)}))] == 1.0
    assert s[("mlpipe_drift_status", frozenset({("model", "digits"), ("status", "insufficient_data")}))] == 0.0
    psi = next(c for c in report["checks"] if c["name"] == "class_psi")
    key = frozenset({("model", "digits"), ("check", "class_psi")})
    assert s[("mlpipe_drift_check_value", key)] == pytest.approx(psi["value"])
    assert s[("mlpipe_drift_check_threshold", key)] == psi["threshold"]
    assert (s[("mlpipe_drift_check_value", key)] > psi["threshold"]) is drifted
    assert s[("mlpipe_drift_live_samples", frozenset({("model", "digits")}))] == 400
    assert s[("mlpipe_drift_champion_version", frozenset({("model", "digits")}))] == 2
    made = dt.datetime(2026, 11, 24, 3, 47, tzinfo=dt.timezone.utc).timestamp()
    assert s[("mlpipe_drift_report_timestamp_seconds", frozenset({("model", "digits")}))] == made


def test_qc_verdicts_checks_and_the_serving_version(store, tiny_onnx):
    from tasks.steps import registry
    from tests.support.models import register_files

    versions = [register_files(store, "digits", {"model.onnx": tiny_onnx}) for _ in range(3)]
    checks = [{"name": "golden_accuracy", "passed": True, "status": "passed", "value": 0.97, "threshold": 0.95},
              {"name": "latency_p95", "passed": None, "status": "skipped", "value": None, "threshold": 50},
              {"name": "class_recall", "passed": False, "status": "failed", "value": 0.41, "threshold": 0.8}]
    for version, verdict in zip(versions[:2], ("passed", "failed")):
        registry.record_artifact(store, "digits", version, layout.QC_REPORT_JSON,
                                 {"verdict": verdict, "checks": checks, "at": "2026-11-24T03:40:00+00:00"})
        registry.update_version(store, "digits", version, lambda m, v=verdict: {**m, "qc": {"verdict": v}})
    registry.set_stage(store, "digits", versions[0], "production", "test", mirror=False)
    s = _samples(ex.qc_families(store, ["digits"]))
    v1, v2, v3 = (str(v) for v in versions)
    assert s[("mlpipe_qc_passed", frozenset({("model", "digits"), ("version", v1)}))] == 1.0
    assert s[("mlpipe_qc_passed", frozenset({("model", "digits"), ("version", v2)}))] == 0.0
    assert ("mlpipe_qc_passed", frozenset({("model", "digits"), ("version", v3)})) not in s  # no verdict yet
    newest = frozenset({("model", "digits"), ("version", v2)})
    assert s[("mlpipe_qc_check_passed", newest | {("check", "golden_accuracy")})] == 1.0
    assert s[("mlpipe_qc_check_passed", newest | {("check", "class_recall")})] == 0.0
    assert ("mlpipe_qc_check_passed", newest | {("check", "latency_p95")}) not in s  # skipped
    assert s[("mlpipe_qc_check_value", newest | {("check", "class_recall")})] == 0.41
    assert s[("mlpipe_model_serving_version", frozenset({("model", "digits")}))] == versions[0]
    judged = dt.datetime(2026, 11, 24, 3, 40, tzinfo=dt.timezone.utc).timestamp()
    assert s[("mlpipe_qc_report_timestamp_seconds", newest)] == judged


def test_lag_from_committed_and_end_offsets():
    s = _samples(ex.lag_families({0: (90, 100), 1: (-1, 7), 2: (5, 5)}, "g", "frames"))
    lag = lambda p: s[("mlpipe_kafka_group_lag_messages", frozenset({("group", "g"), ("topic", "frames"),  # noqa: E731
                                                                     ("partition", p)}))]
    assert (lag("0"), lag("1"), lag("2")) == (10, 7, 0)  # nothing committed: the whole log is lag
    assert s[("mlpipe_kafka_group_lag_total_messages", frozenset({("group", "g"), ("topic", "frames")}))] == 17


class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_cost_per_1k_frames_over_the_window_with_a_restart_and_a_broker_reset():
    clock = _Clock()
    cpu = {"consumer": 100.0, "triton": 50.0}
    frames = {"n": 1_000}
    meter = ex.CostMeter(cpu=lambda: dict(cpu), frames=lambda: frames["n"], window_s=60, clock=clock)
    meter.sample()
    assert meter.per_1k_frames() == {}  # one sample: no window yet
    clock.t, cpu["consumer"], cpu["triton"], frames["n"] = 10, 102.0, 54.0, 3_000
    meter.sample()
    cost = meter.per_1k_frames()
    assert cost["consumer"] == pytest.approx(1.0) and cost["triton"] == pytest.approx(2.0)
    assert cost["all"] == pytest.approx(3.0)
    # the consumer restarted: its new process has used 1 s; the total goes on from 102 (not down to 1)
    clock.t, cpu["consumer"], frames["n"] = 20, 1.0, 4_000
    meter.sample()
    assert meter.totals["consumer"] == pytest.approx(103.0)
    assert meter.per_1k_frames()["consumer"] == pytest.approx(3.0 / 3.0)
    # no frames in a window: no ratio (not infinite)
    for t in (100, 170):
        clock.t = t
        meter.sample()
    assert meter.per_1k_frames() == {}
    # the broker lost its log (committed offsets back to 0): the window starts over
    clock.t, frames["n"] = 180, 0
    meter.sample()
    clock.t, cpu["triton"], frames["n"] = 190, 58.0, 2_000
    meter.sample()
    assert meter.per_1k_frames()["triton"] == pytest.approx(2.0)
    s = _samples(meter.families())
    assert s[("mlpipe_service_cpu_seconds_total", frozenset({("service", "triton")}))] == 58.0
    assert s[("mlpipe_frames_processed_total", frozenset())] == 2_000
    assert s[("mlpipe_cost_cpu_seconds_per_1k_frames", frozenset({("service", "triton")}))] == pytest.approx(2.0)
    assert s[("mlpipe_cost_window_frames", frozenset())] == 2_000


def test_pid_files_and_process_tree_cpu(tmp_path):
    import os

    (tmp_path / "me.pid").write_text(f"{os.getpid()}\n")
    (tmp_path / "broken.pid").write_text("not a pid")
    assert ex.read_pids(tmp_path) == {"me": os.getpid()}
    t0 = ex.tree_cpu_seconds(os.getpid())
    deadline = time.process_time() + 0.05
    while time.process_time() < deadline:
        pass
    assert ex.tree_cpu_seconds(os.getpid()) >= t0 + 0.04
    assert ex.tree_cpu_seconds(2 ** 22 + 12345) is None  # no such process


def test_a_failing_source_leaves_the_others_and_the_broker_down_is_reported(store, monkeypatch):
    from tasks.adapters.kafka import KafkaConfig
    from tasks.local.procs import free_port

    store.put_json(layout.MONITOR_LATEST, _drift_report(True))
    watch = ex.KafkaWatch(KafkaConfig(bootstrap=f"127.0.0.1:{free_port()}"), "mlpipe-consumer", timeout=1.0)
    t0 = time.monotonic()
    watch.poll()
    assert time.monotonic() - t0 < 5
    collector = ex.ExporterCollector(store, ["digits"], watch)
    monkeypatch.setattr(ex, "qc_families", lambda *_a, **_k: 1 / 0)
    s = _samples(collector.collect())
    assert s[("mlpipe_drift_detected", frozenset({("model", "digits")}))] == 1.0
    assert s[("mlpipe_exporter_source_up", frozenset({("source", "qc")}))] == 0.0
    assert s[("mlpipe_exporter_source_up", frozenset({("source", "drift")}))] == 1.0
    assert s[("mlpipe_kafka_up", frozenset())] == 0.0
    assert s[("mlpipe_exporter_source_up", frozenset({("source", "kafka")}))] == 0.0
    assert not [k for k in s if k[0] == "mlpipe_kafka_group_lag_total_messages"]


def test_http_endpoints_and_read_cost(store):
    clock = _Clock()
    cpu = {"consumer": 10.0}
    frames = {"n": 0}
    meter = ex.CostMeter(cpu=lambda: dict(cpu), frames=lambda: frames["n"], clock=clock)
    meter.sample()
    clock.t, cpu["consumer"], frames["n"] = 30, 14.0, 2_000
    meter.sample()
    server = ex.Exporter(ex.ExporterCollector(store, ["digits"], None, meter)).start()
    try:
        import urllib.request

        base = f"http://127.0.0.1:{server.port}"
        with urllib.request.urlopen(f"{base}/healthz", timeout=5) as r:
            assert r.status == 200
        cost = ex.read_cost(f"{base}/metrics")
        assert cost == {"per_1k_frames": {"consumer": pytest.approx(2.0), "all": pytest.approx(2.0)},
                        "window_s": 30.0, "window_frames": 2000}
    finally:
        server.stop()
    assert ex.read_cost(f"http://127.0.0.1:{server.port}/metrics", timeout=1) is None  # stopped
