"""``mlpipe audit`` reading consumer lag and DLQ rate from a real Prometheus's range API: a history of the
exporter's lag gauge and the consumer's dead-letter counter (a burst of poison frames at 03:46) is written into a
TSDB block with ``promtool tsdb create-blocks-from openmetrics``, Prometheus serves it, and the audit of 03:47 must
read the lag at that moment, the peak and the burst from it."""

from __future__ import annotations

import datetime as dt
import subprocess

import pytest

from tasks.local.procs import ManagedProcess, free_port, port_open, wait_until
from tasks.tools import audit

pytestmark = [pytest.mark.integration]
UTC = dt.timezone.utc
AT = dt.datetime(2026, 11, 24, 3, 47, tzinfo=UTC)


def _history() -> str:
    """15-second samples from 03:20 to 04:10: lag 5, rising to 400 at 03:47 and back; 40 dead letters in 03:46."""
    lag, dlq = ["# TYPE mlpipe_kafka_group_lag_total_messages gauge"], ["# TYPE mlpipe_consumer_dead_letters counter"]
    start = AT - dt.timedelta(minutes=27)
    dead = 0
    for i in range(int(50 * 60 / 15) + 1):
        t = start + dt.timedelta(seconds=15 * i)
        minutes = (t - AT).total_seconds() / 60
        value = 400 if abs(minutes) < 0.01 else (200 if -3 <= minutes <= 3 else 5)
        lag.append(f'mlpipe_kafka_group_lag_total_messages{{group="mlpipe-consumer",topic="frames"}} {value} '
                   f"{t.timestamp():.0f}")
        if AT - dt.timedelta(minutes=1) < t <= AT:
            dead += 10
        dlq.append(f'mlpipe_consumer_dead_letters_total{{reason="undecodable"}} {dead} {t.timestamp():.0f}')
    return "\n".join(lag + dlq) + "\n# EOF\n"


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory):
    from tasks.local import prometheus as prom

    why = prom.available()
    if why:
        pytest.skip(why)
    folder = tmp_path_factory.mktemp("prometheus-audit")
    (folder / "history.om").write_text(_history())
    made = subprocess.run([str(prom.promtool_binary()), "tsdb", "create-blocks-from", "openmetrics",
                           str(folder / "history.om"), str(folder / "data")], capture_output=True, text=True,
                          timeout=120)
    assert made.returncode == 0, made.stderr[-2000:]
    config = folder / "prometheus.yml"
    config.write_text("global:\n  scrape_interval: 15s\nscrape_configs: []\n")
    port = free_port()
    proc = ManagedProcess("prometheus", prom.command(folder, port, config, retention="3650d"),
                          folder / "prometheus.log").start()
    try:
        wait_until(lambda: port_open(port), 60, "prometheus", alive=proc.alive)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.stop()


def test_lag_and_dlq_rate_at_the_moment_come_from_prometheus(prometheus, store):
    source = audit.PrometheusSource(prometheus)

    def ready() -> bool:
        return bool(source.series(audit.LAG_QUERIES[0], AT - dt.timedelta(minutes=5), AT, 15))

    wait_until(ready, 60, "prometheus to load the backfilled block")
    answer = audit.build_audit(store, "digits", audit.parse_at("2026-11-24 03:47"), audit.parse_window("30m"),
                               metrics=source)
    lag, dlq = answer.metrics["lag"], answer.metrics["dlq"]
    assert lag["source"] == f"Prometheus {prometheus}" and lag["query"] == audit.LAG_QUERIES[0]
    assert lag["at_moment"] == 400 and lag["max"] == 400 and lag["max_at"] == AT.isoformat()
    assert 5 <= lag["mean"] < 200
    # 40 frames dead-lettered in the minute before 03:47: a rate of about 40 a minute there, none long before
    assert dlq["unit"] == "frames per minute" and 30 <= dlq["max"] <= 60
    assert dt.datetime.fromisoformat(dlq["max_at"]) <= AT + dt.timedelta(minutes=1)
    first = dict((t, v) for t, v in dlq["series"])
    assert first[(AT - dt.timedelta(minutes=10)).isoformat()] == 0
    text = audit.render_text(answer)
    assert "consumer lag: 400 messages at the moment" in text and f"({lag['source']})" in text
    assert not any("consumer lag" in n for n in answer.notes)


def test_a_prometheus_that_cannot_be_reached_is_named(store):
    answer = audit.build_audit(store, "digits", AT, audit.parse_window("10m"),
                               metrics=audit.PrometheusSource(f"http://127.0.0.1:{free_port()}", timeout=2))
    assert answer.metrics["lag"] is None
    assert any(n.startswith("metrics: Prometheus http://127.0.0.1:") for n in answer.notes)
