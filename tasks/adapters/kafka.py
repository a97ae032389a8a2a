"""The message bus: the only module that talks to Kafka.

* ``KafkaConfig``: connection settings from ``MLPIPE_KAFKA_*`` environment
  variables, turned into confluent-kafka configuration dicts for producers,
  consumers and admin clients. Secrets are never logged or put in ``repr``.
* ``ensure_topics`` / ``delete_topics``: idempotent topic administration.
* ``BusProducer``: asynchronous produce with delivery tracking and a confirmed
  flush (``flush_confirmed`` raises unless every message was acknowledged).
* ``BatchConsumer``: a consumer-group member with manual commits, batch polls,
  pause/resume of the whole assignment and consumer-lag from client statistics.
* ``BrokerWatch``: what identifies the broker's log (cluster id, topic ids): a change means the
  broker lost or replaced its log (``Incarnation.changed_from``).
* ``TailFollower``: an assign-only reader of the last N messages of topics
  (no group, nothing committed), used by the gateway's prediction cache.

Topics (``KafkaConfig.topic(...)`` adds ``MLPIPE_KAFKA_TOPIC_PREFIX``, for
test isolation): ``frames``, ``predictions``, ``frames.dlq``.

Trap measured on Tansu 0.6: ListOffsets("latest") (``get_watermark_offsets``
with ``cached=False``) returns the base offset of the last record batch + 1,
not the high watermark. Lag therefore comes from the statistics callback (the
fetch responses' high watermark), which is right.

CLI: ``mlpipe kafka topics --help``; the local broker is ``tasks.local.broker``.
"""

from __future__ import annotations

import argparse
import json
import logging
import secrets
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence


from tasks.contracts.errors import Transient
from tasks.contracts.messages import DEFAULT_MAX_MESSAGE_BYTES, FRAMES, FRAMES_DLQ, PREDICTIONS

logger = logging.getLogger(__name__)

class BusError(Transient, RuntimeError):
    """A Kafka operation failed (the message says which and what to check; transient)."""


class DeliveryError(BusError):
    """Some produced messages were not acknowledged by the broker."""


# --------------------------------------------------------------------------- readiness


def broker_ready(bootstrap: str, timeout: float = 2.0) -> bool:
    """True when the broker at ``bootstrap`` answers a metadata request."""
    from confluent_kafka.admin import AdminClient

    try:
        admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0, "logger": _quiet_logger()})
        admin.list_topics(timeout=timeout)
        return True
    except Exception:  # noqa: BLE001 - any failure means "not ready yet"
        return False


# --------------------------------------------------------------------------- configuration


_SECRET_KEYS = ("sasl.password", "ssl.key.password", "ssl.key.pem", "sasl.oauthbearer.client.secret")


def redact(conf: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a client config safe to log (secrets and callbacks hidden)."""
    out: dict[str, Any] = {}
    for key, value in conf.items():
        if key in _SECRET_KEYS or "password" in key or "secret" in key:
            out[key] = "***"
        elif callable(value):
            out[key] = f"<{getattr(value, '__name__', 'callable')}>"
        else:
            out[key] = value
    return out


@dataclass(frozen=True)
class KafkaConfig:
    """Kafka connection settings. ``from_env()`` reads ``MLPIPE_KAFKA_*``.

    ``MLPIPE_KAFKA_BOOTSTRAP`` (default ``127.0.0.1:9092``),
    ``MLPIPE_KAFKA_SECURITY_PROTOCOL`` (PLAINTEXT | SSL | SASL_PLAINTEXT | SASL_SSL),
    ``MLPIPE_KAFKA_SASL_MECHANISM`` (PLAIN | SCRAM-SHA-256 | SCRAM-SHA-512),
    ``MLPIPE_KAFKA_SASL_USERNAME``, ``MLPIPE_KAFKA_SASL_PASSWORD``,
    ``MLPIPE_KAFKA_SSL_CA`` (CA file), ``MLPIPE_KAFKA_SSL_CERT``, ``MLPIPE_KAFKA_SSL_KEY``
    (client certificate and key files), ``MLPIPE_KAFKA_TOPIC_PREFIX`` (prepended to
    every topic name), ``MLPIPE_KAFKA_CLIENT_ID``, ``MLPIPE_KAFKA_PARTITIONS`` and
    ``MLPIPE_KAFKA_REPLICATION`` (used when topics are created), ``MLPIPE_MAX_MESSAGE_BYTES`` (default
    1 000 000, librdkafka's: the producers' ``message.max.bytes`` and the topics' ``max.message.bytes``
    when they are created; the consumer keeps every message it writes below it).
    """

    bootstrap: str = "127.0.0.1:9092"
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str = ""
    sasl_username: str = ""
    sasl_password: str = field(default="", repr=False)
    ssl_ca: str = ""
    ssl_cert: str = ""
    ssl_key: str = field(default="", repr=False)
    topic_prefix: str = ""
    client_id: str = "mlpipe"
    partitions: int = 3
    replication: int = 1
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES

    @classmethod
    def from_env(cls, **overrides: Any) -> "KafkaConfig":
        from tasks.config import load_settings

        ks = load_settings().kafka
        values: dict[str, Any] = dict(
            bootstrap=ks.bootstrap, security_protocol=ks.security_protocol, sasl_mechanism=ks.sasl_mechanism,
            sasl_username=ks.sasl_username, sasl_password=ks.sasl_password.get_secret_value(), ssl_ca=ks.ssl_ca,
            ssl_cert=ks.ssl_cert, ssl_key=ks.ssl_key, topic_prefix=ks.topic_prefix, client_id=ks.client_id,
            partitions=ks.partitions, replication=ks.replication,
            max_message_bytes=ks.max_message_bytes,
        )
        values.update({k: v for k, v in overrides.items() if v is not None})
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        protocols = {"PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"}
        if self.security_protocol not in protocols:
            raise ValueError(f"MLPIPE_KAFKA_SECURITY_PROTOCOL must be one of {sorted(protocols)}, "
                             f"got {self.security_protocol!r}")
        if self.security_protocol.startswith("SASL"):
            if not self.sasl_mechanism:
                raise ValueError(f"security protocol {self.security_protocol} needs MLPIPE_KAFKA_SASL_MECHANISM "
                                 "(PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512)")
            if self.sasl_mechanism.upper() in {"PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"} and not (
                    self.sasl_username and self.sasl_password):
                raise ValueError(f"SASL mechanism {self.sasl_mechanism} needs MLPIPE_KAFKA_SASL_USERNAME and "
                                 "MLPIPE_KAFKA_SASL_PASSWORD")
        if not self.bootstrap:
            raise ValueError("MLPIPE_KAFKA_BOOTSTRAP is empty: set it to host:port[,host:port]")
        if not 1024 <= self.max_message_bytes <= 1_000_000_000:
            raise ValueError(f"MLPIPE_MAX_MESSAGE_BYTES must be within 1024..1000000000, got {self.max_message_bytes}")

    # topic names -------------------------------------------------------
    def topic(self, name: str) -> str:
        return f"{self.topic_prefix}{name}"

    @property
    def frames_topic(self) -> str:
        return self.topic(FRAMES)

    @property
    def predictions_topic(self) -> str:
        return self.topic(PREDICTIONS)

    @property
    def dlq_topic(self) -> str:
        return self.topic(FRAMES_DLQ)

    @property
    def all_topics(self) -> list[str]:
        return [self.frames_topic, self.predictions_topic, self.dlq_topic]

    # client configs ----------------------------------------------------
    def common(self) -> dict[str, Any]:
        conf: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap,
            "client.id": self.client_id,
            "security.protocol": self.security_protocol,
            # reconnect to a broker that comes back within 2 s (librdkafka's default backs off to 10 s)
            "reconnect.backoff.max.ms": 2000,
        }
        if self.security_protocol.startswith("SASL"):
            conf["sasl.mechanism"] = self.sasl_mechanism.upper()
            if self.sasl_username:
                conf["sasl.username"] = self.sasl_username
            if self.sasl_password:
                conf["sasl.password"] = self.sasl_password
        if self.security_protocol in {"SSL", "SASL_SSL"}:
            if self.ssl_ca:
                conf["ssl.ca.location"] = self.ssl_ca
            if self.ssl_cert:
                conf["ssl.certificate.location"] = self.ssl_cert
            if self.ssl_key:
                conf["ssl.key.location"] = self.ssl_key
        return conf

    def producer_config(self, **overrides: Any) -> dict[str, Any]:
        conf = self.common()
        conf.update({
            "enable.idempotence": True,  # acks=all, ordered, no duplicates from retries
            "linger.ms": 2,
            "message.timeout.ms": 60000,
            "message.max.bytes": self.max_message_bytes,
        })
        conf.update(overrides)
        return conf

    def consumer_config(self, group_id: str, **overrides: Any) -> dict[str, Any]:
        conf = self.common()
        conf.update({
            "group.id": group_id,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "session.timeout.ms": 10000,
            "max.poll.interval.ms": 300000,
            # incremental rebalances: a member joining or leaving moves only the partitions that change owner,
            # the others keep being consumed (eager: every member stops and gives up everything). Every member of
            # a group must use the same strategy (verified on Tansu 0.6: joins, incremental revoke/assign)
            "partition.assignment.strategy": "cooperative-sticky",
        })
        conf.update(overrides)
        if "heartbeat.interval.ms" not in overrides:
            # librdkafka's default (3 s) would let a short session (tests: 2-6 s) time out.
            conf["heartbeat.interval.ms"] = max(100, min(3000, int(conf["session.timeout.ms"]) // 5))
        return conf

    def admin_config(self, **overrides: Any) -> dict[str, Any]:
        conf = self.common()
        conf.update(overrides)
        return conf


def _quiet_logger() -> logging.Logger:
    lg = logging.getLogger(__name__ + ".librdkafka")
    return lg


def _client_logging(conf: dict[str, Any]) -> dict[str, Any]:
    """librdkafka logs to our logger (not stderr); connection noise at debug level."""
    conf.setdefault("logger", _quiet_logger())
    return conf


# --------------------------------------------------------------------------- admin


def ensure_topics(cfg: KafkaConfig, topics: Sequence[str] | None = None, partitions: int | None = None,
                  replication: int | None = None, timeout: float = 15.0) -> list[str]:
    """Create the topics that do not exist yet (default: frames, predictions, frames.dlq).

    Idempotent: existing topics are left alone. Returns the topics created.
    Raises ``BusError`` when the broker cannot be reached in ``timeout``.
    """
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic

    names = list(topics) if topics is not None else cfg.all_topics
    admin = AdminClient(_client_logging(cfg.admin_config()))
    try:
        existing = set(admin.list_topics(timeout=timeout).topics)
    except KafkaException as exc:
        raise BusError(f"cannot reach Kafka at {cfg.bootstrap} to create topics: {exc}; "
                       "check MLPIPE_KAFKA_BOOTSTRAP and the security settings") from exc
    missing = [t for t in names if t not in existing]
    created: list[str] = []
    if missing:
        futures = admin.create_topics(
            [NewTopic(t, num_partitions=partitions or cfg.partitions,
                      replication_factor=replication or cfg.replication,
                      config={"max.message.bytes": str(cfg.max_message_bytes)}) for t in missing],
            operation_timeout=timeout, request_timeout=timeout)
        for name, fut in futures.items():
            try:
                fut.result(timeout=timeout)
                created.append(name)
            except KafkaException as exc:
                if exc.args and exc.args[0].code() == KafkaError.TOPIC_ALREADY_EXISTS:
                    continue
                raise BusError(f"could not create topic {name!r}: {exc}") from exc
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(t in admin.list_topics(timeout=timeout).topics for t in names):
                break
            time.sleep(0.05)
        logger.info("created topics %s on %s", created, cfg.bootstrap)
    return created


def delete_topics(cfg: KafkaConfig, topics: Sequence[str] | None = None, timeout: float = 15.0) -> None:
    """Delete topics (default: the three of ``cfg``); missing ones are ignored."""
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import AdminClient

    names = list(topics) if topics is not None else cfg.all_topics
    admin = AdminClient(_client_logging(cfg.admin_config()))
    existing = set(admin.list_topics(timeout=timeout).topics)
    names = [t for t in names if t in existing]
    if not names:
        return
    for name, fut in admin.delete_topics(names, operation_timeout=timeout, request_timeout=timeout).items():
        try:
            fut.result(timeout=timeout)
        except KafkaException as exc:
            if exc.args and exc.args[0].code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                continue
            raise BusError(f"could not delete topic {name!r}: {exc}") from exc


def committed_offsets(cfg: KafkaConfig, group_id: str, topic: str, timeout: float = 10.0) -> dict[int, int]:
    """The group's committed offset per partition of ``topic`` (-1: nothing committed)."""
    from confluent_kafka import Consumer, KafkaException, TopicPartition

    consumer = Consumer(_client_logging(cfg.consumer_config(group_id)))
    try:
        md = consumer.list_topics(topic, timeout=timeout).topics.get(topic)
        if md is None or md.error is not None:
            raise BusError(f"topic {topic!r} not found on {cfg.bootstrap}")
        parts = consumer.committed([TopicPartition(topic, p) for p in sorted(md.partitions)], timeout=timeout)
        return {tp.partition: (tp.offset if tp.offset >= 0 else -1) for tp in parts}
    except KafkaException as exc:
        raise BusError(f"cannot read committed offsets of group {group_id!r}: {exc}") from exc
    finally:
        consumer.close()


def _end_offsets(consumer: Any, topic: str, partitions: Sequence[int], timeout: float) -> dict[int, int]:
    """The end offset (high watermark) of each partition, as a fetch reports it.

    ListOffsets alone is not enough: Tansu 0.6 answers it with the base offset of the last record batch
    + 1 (a batch of 10 frames counts as one), while a fetch response carries the true high watermark.
    So the listed end is read first and, where the partition is not empty, one fetch from just before
    it (assign-only: no group is joined, nothing is committed) gives the real one. With Kafka both agree."""
    from confluent_kafka import TopicPartition

    ends = {p: int(consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout)[1]) for p in partitions}
    pending = {p for p, end in ends.items() if end > 0}
    if not pending:
        return ends
    consumer.assign([TopicPartition(topic, p, ends[p] - 1) for p in sorted(pending)])
    deadline = time.monotonic() + timeout
    try:
        while pending and time.monotonic() < deadline:
            msg = consumer.poll(min(0.2, max(0.01, deadline - time.monotonic())))
            if msg is None or msg.error() is not None or msg.partition() not in pending:
                continue
            high = consumer.get_watermark_offsets(TopicPartition(topic, msg.partition()), cached=True)[1]
            ends[msg.partition()] = max(ends[msg.partition()], int(high), msg.offset() + 1)
            pending.discard(msg.partition())
    finally:
        consumer.unassign()
    if pending:
        raise BusError(f"no fetch answer for {topic} partitions {sorted(pending)} within {timeout:.0f}s")
    return ends


def group_offsets(cfg: KafkaConfig, group_id: str, topic: str, timeout: float = 10.0) -> dict[int, tuple[int, int]]:
    """Partition -> (the group's committed offset, -1 when none; the end offset) of ``topic``, read from
    outside the group (an OffsetFetch and the end offsets, ``_end_offsets``; joins nothing): the lag an
    observer measures even while the consumer itself is stuck or gone."""
    from confluent_kafka import Consumer, KafkaException, TopicPartition

    # a reader of its own: the OffsetFetch names the group, the fetch for the end offsets joins nothing
    consumer = Consumer(_client_logging(cfg.consumer_config(group_id)))
    try:
        md = consumer.list_topics(topic, timeout=timeout).topics.get(topic)
        if md is None or md.error is not None:
            raise BusError(f"topic {topic!r} not found on {cfg.bootstrap}")
        partitions = sorted(md.partitions)
        parts = consumer.committed([TopicPartition(topic, p) for p in partitions], timeout=timeout)
        ends = _end_offsets(consumer, topic, partitions, timeout)
        return {tp.partition: (tp.offset if tp.offset >= 0 else -1, ends[tp.partition]) for tp in parts}
    except KafkaException as exc:
        raise BusError(f"cannot read the offsets of group {group_id!r} on {topic!r}: {exc}") from exc
    finally:
        consumer.close()


def topic_end_offsets(cfg: KafkaConfig, topic: str, timeout: float = 10.0) -> dict[int, int]:
    """Partition -> end offset (high watermark) of ``topic``: how many messages were ever written to it."""
    from confluent_kafka import Consumer, KafkaException

    consumer = Consumer(_client_logging(cfg.consumer_config("mlpipe-offsets-reader")))  # joins no group
    try:
        md = consumer.list_topics(topic, timeout=timeout).topics.get(topic)
        if md is None or md.error is not None:
            raise BusError(f"topic {topic!r} not found on {cfg.bootstrap}")
        return _end_offsets(consumer, topic, sorted(md.partitions), timeout)
    except KafkaException as exc:
        raise BusError(f"cannot read the end offsets of {topic!r}: {exc}") from exc
    finally:
        consumer.close()


# --------------------------------------------------------------------------- messages


@dataclass
class Record:
    """One consumed message (a plain copy; no confluent-kafka object leaks out of this module)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: dict[str, bytes]
    raw_headers: list[tuple[str, bytes]]
    timestamp_ms: int | None = None

    def header(self, name: str, default: str | None = None) -> str | None:
        value = self.headers.get(name)
        if value is None:
            return default
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return default


def _to_record(msg: Any) -> Record:
    raw = msg.headers() or []
    raw_headers = [(k, v if v is not None else b"") for k, v in raw]
    headers: dict[str, bytes] = {}
    for k, v in raw_headers:
        headers.setdefault(k, v)  # first one wins
    ts_type, ts = msg.timestamp()
    return Record(topic=msg.topic(), partition=msg.partition(), offset=msg.offset(), key=msg.key(),
                  value=msg.value(), headers=headers, raw_headers=raw_headers,
                  timestamp_ms=ts if ts_type != 0 else None)


def new_traceparent(parent: str | None = None) -> str:
    """A W3C ``traceparent`` for a new span: continue ``parent``'s trace when it is valid."""
    trace_id = None
    flags = "01"
    if parent:
        parts = parent.strip().lower().split("-")
        if (len(parts) == 4 and parts[0] == "00" and len(parts[1]) == 32 and len(parts[2]) == 16
                and len(parts[3]) == 2 and all(c in "0123456789abcdef" for c in "".join(parts))
                and parts[1] != "0" * 32 and parts[2] != "0" * 16):
            trace_id, flags = parts[1], parts[3]
    if trace_id is None:
        trace_id = secrets.token_hex(16)
    return f"00-{trace_id}-{secrets.token_hex(8)}-{flags}"


# --------------------------------------------------------------------------- producer


def _permanent_codes() -> frozenset[int]:
    """Produce errors no retry of the same message can cure (it is too large or malformed for the broker)."""
    from confluent_kafka import KafkaError

    names = ("MSG_SIZE_TOO_LARGE", "RECORD_LIST_TOO_LARGE", "INVALID_RECORD", "INVALID_MSG_SIZE", "INVALID_MSG",
             "_INVALID_ARG")
    return frozenset(getattr(KafkaError, n) for n in names if hasattr(KafkaError, n))


class DeliveryTicket:
    """Delivery state of one ``BusProducer.produce_batch`` call.

    ``failed``: messages whose delivery failed and may succeed when produced again; ``rejected``:
    ``(message, error)`` the broker or the client refused for good (larger than ``message.max.bytes``,
    malformed): producing them again cannot succeed, the caller replaces or drops them."""

    __slots__ = ("pending", "failed", "errors", "rejected", "_permanent")

    def __init__(self, count: int) -> None:
        self.pending = count
        self.failed: list[tuple[str, bytes | None, bytes | None, list[tuple[str, bytes]]]] = []
        self.errors: list[str] = []
        self.rejected: list[tuple[tuple[str, bytes | None, bytes | None, list[tuple[str, bytes]]], str]] = []
        self._permanent = _permanent_codes()

    def _on_delivery(self, err: Any, msg: Any) -> None:
        self.pending -= 1
        if err is not None:
            message = (msg.topic(), msg.value(), msg.key(), list(msg.headers() or []))
            if err.code() in self._permanent:
                self.rejected.append((message, str(err)))
            else:
                self.errors.append(str(err))
                self.failed.append(message)


class BusProducer:
    """An idempotent producer with delivery tracking.

    ``produce()`` is asynchronous; ``flush_confirmed()`` waits until every
    message produced since the previous confirm was acknowledged and raises
    ``DeliveryError`` (listing the failures) otherwise. ``produce(..., on_delivery=cb)``
    calls ``cb(error_or_None)`` from ``poll()``/``flush`` for per-message use.
    """

    def __init__(self, cfg: KafkaConfig, **overrides: Any) -> None:
        from confluent_kafka import Producer

        self.cfg = cfg
        self._producer = Producer(_client_logging(cfg.producer_config(**overrides)))
        self._lock = threading.Lock()
        self._pending = 0
        self._errors: list[str] = []

    def _make_cb(self, user_cb: Callable[[str | None], None] | None) -> Callable[[Any, Any], None]:
        def cb(err: Any, msg: Any) -> None:
            with self._lock:
                self._pending -= 1
                if err is not None:
                    self._errors.append(f"{msg.topic() if msg else '?'}: {err}")
            if user_cb is not None:
                user_cb(None if err is None else str(err))
        return cb

    def produce(self, topic: str, value: bytes | None, key: bytes | str | None = None,
                headers: Sequence[tuple[str, bytes | str]] | Mapping[str, bytes | str] | None = None,
                on_delivery: Callable[[str | None], None] | None = None) -> None:
        """Queue one message; on a full local queue, serve callbacks and retry."""
        if isinstance(headers, Mapping):
            headers = list(headers.items())
        hdrs = [(k, v.encode() if isinstance(v, str) else v) for k, v in (headers or [])]
        with self._lock:
            self._pending += 1
        cb = self._make_cb(on_delivery)
        while True:
            try:
                self._producer.produce(topic, value=value, key=key, headers=hdrs, on_delivery=cb)
                return
            except BufferError:
                self._producer.poll(0.05)
            except Exception:
                with self._lock:
                    self._pending -= 1
                raise

    def produce_batch(self, messages: Sequence[tuple[str, bytes | None, bytes | None, list[tuple[str, bytes]]]]
                      ) -> "DeliveryTicket":
        """Queue many ``(topic, value, key, headers)`` messages; ``wait(ticket)`` confirms just these.

        Tickets are meant for one thread that also calls ``wait``/``poll`` (the consumer loop).
        """
        from confluent_kafka import KafkaException

        ticket = DeliveryTicket(len(messages))
        produce = self._producer.produce
        cb = ticket._on_delivery
        for message in messages:
            topic, value, key, headers = message
            while True:
                try:
                    produce(topic, value=value, key=key, headers=headers, on_delivery=cb)
                    break
                except BufferError:
                    self._producer.poll(0.05)
                except KafkaException as exc:  # refused before it was queued (e.g. MSG_SIZE_TOO_LARGE)
                    err = exc.args[0] if exc.args else None
                    code = err.code() if err is not None and hasattr(err, "code") else None
                    ticket.pending -= 1
                    if code in ticket._permanent:
                        ticket.rejected.append((message, str(exc)))
                    else:
                        ticket.errors.append(str(exc))
                        ticket.failed.append(message)
                    break
        return ticket

    def wait(self, ticket: "DeliveryTicket", timeout: float = 30.0,
             give_up: Callable[[], bool] | None = None) -> None:
        """Serve delivery reports until every message of ``ticket`` is acknowledged.

        Raises ``DeliveryError`` if some failed (``ticket.failed`` holds them, ready for
        ``produce_batch`` again) or are still unacknowledged after ``timeout``, or earlier once
        ``give_up()`` is true (checked every 50 ms: a shutdown must not wait out a broker outage).
        """
        started = time.monotonic()
        deadline = started + timeout
        while ticket.pending > 0:
            left = deadline - time.monotonic()
            if left <= 0 or (give_up is not None and give_up()):
                break
            # flush, not poll: it sends what is queued at once instead of after linger.ms (and serves the
            # delivery reports); the caller waits for these acks anyway
            self._producer.flush(min(left, 0.05))
        if ticket.errors and ticket.pending == 0:
            raise DeliveryError(f"{len(ticket.errors)} message(s) not delivered to {self.cfg.bootstrap}: "
                                f"{ticket.errors[0]}")
        if ticket.pending:
            raise DeliveryError(f"{ticket.pending} message(s) still unacknowledged after "
                                f"{time.monotonic() - started:.1f}s: "
                                f"is the broker at {self.cfg.bootstrap} reachable?")

    def poll(self, timeout: float = 0.0) -> int:
        return self._producer.poll(timeout)

    @property
    def pending(self) -> int:
        with self._lock:
            return self._pending

    def flush_confirmed(self, timeout: float = 30.0) -> None:
        """Wait until every queued message is acknowledged; raise ``DeliveryError`` otherwise."""
        remaining = self._producer.flush(timeout)
        with self._lock:
            errors, self._errors = self._errors, []
        if errors:
            raise DeliveryError(f"{len(errors)} message(s) not delivered to {self.cfg.bootstrap}: "
                                f"{errors[0]}" + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""))
        if remaining:
            raise DeliveryError(f"{remaining} message(s) still unacknowledged after {timeout:.0f}s: "
                                f"is the broker at {self.cfg.bootstrap} reachable?")

    def close(self, timeout: float = 5.0) -> None:
        self._producer.flush(timeout)


# --------------------------------------------------------------------------- consumer


@dataclass(frozen=True)
class CommitResult:
    ok: bool
    retriable: bool
    error: str = ""


class BatchConsumer:
    """A consumer-group member with manual commits.

    * ``poll_batch(max_messages, timeout)`` returns ``Record`` objects; errors
      (broker down, unknown topic) are logged and counted, never raised.
    * ``pause()`` / ``resume()`` act on the whole assignment; partitions
      assigned while paused are paused too, so a rebalance during an outage
      does not start fetching again. Keep calling ``poll_batch`` while paused:
      it serves rebalances and keeps this member in the group.
    * ``commit(offsets)`` commits ``{(topic, partition): next_offset}``
      synchronously. Offsets of partitions no longer assigned are skipped.
    * ``lag()`` is the consumer lag per partition, from the statistics callback.
    * ``on_revoke`` / ``on_assign`` user callbacks receive ``[(topic, partition)]``; ``on_assign`` the
      whole assignment after the change, ``on_revoke`` only what is revoked.
    * The group protocol is ``cooperative-sticky`` (``KafkaConfig.consumer_config``; ``cooperative``): a
      rebalance revokes and assigns incrementally, so a member keeps consuming the partitions that do not
      move. Eager strategies (``partition.assignment.strategy`` overridden) still work: everything is
      revoked, then the whole new assignment comes.
    """

    def __init__(self, cfg: KafkaConfig, group_id: str, topics: Sequence[str], *,
                 on_assign: Callable[[list[tuple[str, int]]], None] | None = None,
                 on_revoke: Callable[[list[tuple[str, int]]], None] | None = None,
                 stats_interval_ms: int = 5000, **overrides: Any) -> None:
        from confluent_kafka import Consumer

        self.cfg = cfg
        self.group_id = group_id
        self.topics = list(topics)
        self._user_assign = on_assign
        self._user_revoke = on_revoke
        self._paused = False
        self._assignment: set[tuple[str, int]] = set()
        self.assigned_once = False
        self.in_group = False
        self.last_error: str = ""
        self.errors = 0
        self._warned: dict[str, float] = {}
        self._lag: dict[tuple[str, int], int] = {}
        conf = cfg.consumer_config(group_id, **overrides)
        if stats_interval_ms > 0:
            conf["statistics.interval.ms"] = stats_interval_ms
            conf["stats_cb"] = self._on_stats
        conf["error_cb"] = self._on_error
        conf["on_commit"] = self._on_commit
        self.commit_errors = 0
        self.cooperative = "cooperative" in str(conf.get("partition.assignment.strategy", ""))
        self._consumer = Consumer(_client_logging(conf))
        self._consumer.subscribe(self.topics, on_assign=self._on_assign, on_revoke=self._on_revoke,
                                 on_lost=self._on_revoke)

    # callbacks (run inside poll) ---------------------------------------
    def _on_assign(self, consumer: Any, partitions: list[Any]) -> None:
        """Eager: ``partitions`` is the whole new assignment (after a revoke of everything); cooperative: only
        the partitions added (often none). Assigned here, before pausing them: a pause before the assignment
        takes effect would not hold."""
        if self.cooperative:
            consumer.incremental_assign(partitions)
        else:
            consumer.assign(partitions)
        self._assignment |= {(p.topic, p.partition) for p in partitions}
        self.assigned_once = True
        self.in_group = True
        logger.info("assigned %s (now %s)", sorted((p.topic, p.partition) for p in partitions),
                    sorted(self._assignment))
        if self._paused and partitions:
            consumer.pause(partitions)
        if self._user_assign:
            self._user_assign(sorted(self._assignment))

    def _on_revoke(self, consumer: Any, partitions: list[Any]) -> None:
        revoked = [(p.topic, p.partition) for p in partitions]
        logger.info("revoked %s", revoked)
        if self._user_revoke:
            self._user_revoke(revoked)
        self._assignment -= set(revoked)
        # eager (or a lost session): everything went, out of the group until the next assignment; cooperative:
        # the partitions kept are still consumed
        self.in_group = bool(self._assignment)
        for tp in revoked:
            self._lag.pop(tp, None)

    def _warn(self, text: str) -> None:
        """Log a client error, at most once per 30 s for the same text (a broker outage repeats them)."""
        now = time.monotonic()
        if now - self._warned.get(text, -1e9) >= 30.0:
            self._warned[text] = now
            logger.warning("kafka: %s", text)
        else:
            logger.debug("kafka: %s", text)

    def _on_error(self, err: Any) -> None:
        self.errors += 1
        self.last_error = str(err)
        self._warn(str(err))

    def _on_commit(self, err: Any, partitions: list[Any]) -> None:
        failed = [p for p in partitions or [] if p.error is not None]
        if err is not None or failed:
            self.commit_errors += 1
            logger.warning("offset commit failed (%s); a later commit covers it", err or failed[0].error)

    def _on_stats(self, stats_json: str) -> None:
        try:
            stats = json.loads(stats_json)
        except ValueError:
            return
        lag: dict[tuple[str, int], int] = {}
        for topic, tstats in stats.get("topics", {}).items():
            for pid, pstats in tstats.get("partitions", {}).items():
                p = int(pid)
                if p < 0 or (topic, p) not in self._assignment:
                    continue
                value = pstats.get("consumer_lag", -1)
                if value is not None and value >= 0:
                    lag[(topic, p)] = int(value)
        self._lag = lag

    # API -----------------------------------------------------------------
    @property
    def assignment(self) -> list[tuple[str, int]]:
        return sorted(self._assignment)

    @property
    def paused(self) -> bool:
        return self._paused

    def lag(self) -> dict[tuple[str, int], int]:
        return dict(self._lag)

    def poll_batch(self, max_messages: int, timeout: float) -> list[Record]:
        from confluent_kafka import KafkaError

        out: list[Record] = []
        for msg in self._consumer.consume(num_messages=max_messages, timeout=timeout):
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    continue
                self.errors += 1
                self.last_error = str(err)
                self._warn(str(err))
                continue
            out.append(_to_record(msg))
        return out

    def _tps(self) -> list[Any]:
        from confluent_kafka import TopicPartition

        return [TopicPartition(t, p) for t, p in sorted(self._assignment)]

    def pause(self) -> None:
        if not self._paused:
            self._paused = True
            tps = self._tps()
            if tps:
                self._consumer.pause(tps)
            logger.info("paused fetching from %d partition(s)", len(tps))

    def resume(self) -> None:
        if self._paused:
            self._paused = False
            tps = self._tps()
            if tps:
                self._consumer.resume(tps)
            logger.info("resumed fetching from %d partition(s)", len(tps))

    def rewind(self, offsets: Mapping[tuple[str, int], int]) -> None:
        """Seek assigned partitions back to ``offsets`` (the first unprocessed offset)."""
        from confluent_kafka import KafkaException, TopicPartition

        for (topic, part), off in offsets.items():
            if (topic, part) in self._assignment:
                try:
                    self._consumer.seek(TopicPartition(topic, part, off))
                except KafkaException as exc:
                    logger.warning("seek %s[%d]@%d failed: %s", topic, part, off, exc)

    def reposition(self, timeout: float = 5.0) -> dict[tuple[str, int], int]:
        """Seek every assigned partition to the group's committed offset, or to its start when there is none
        (the broker lost its log: the fetch positions of the old one mean nothing). Returns what was sought
        (-2: the start)."""
        from confluent_kafka import OFFSET_BEGINNING, KafkaException, TopicPartition

        tps = self._tps()
        if not tps:
            return {}
        try:
            committed = self._consumer.committed(tps, timeout=timeout)
        except KafkaException as exc:
            logger.warning("committed offsets not readable (%s): re-reading from the start", exc)
            committed = [TopicPartition(tp.topic, tp.partition, OFFSET_BEGINNING) for tp in tps]
        out: dict[tuple[str, int], int] = {}
        for tp in committed:
            off = tp.offset if tp.offset >= 0 else OFFSET_BEGINNING
            try:
                self._consumer.seek(TopicPartition(tp.topic, tp.partition, off))
                out[(tp.topic, tp.partition)] = off
            except KafkaException as exc:  # not fetching yet: its position comes from the committed offset
                logger.info("seek %s[%d] to %d: %s", tp.topic, tp.partition, off, exc)
        return out

    def commit(self, offsets: Mapping[tuple[str, int], int], asynchronous: bool = False) -> CommitResult:
        """Commit ``{(topic, partition): next_offset_to_read}`` (partitions no longer assigned are skipped).

        Synchronous by default. ``asynchronous=True`` returns at once; a failure is logged and
        counted in ``commit_errors`` (the next commit covers it; at worst frames are redelivered).
        """
        from confluent_kafka import KafkaError, KafkaException, TopicPartition

        tps = [TopicPartition(t, p, o) for (t, p), o in offsets.items() if (t, p) in self._assignment]
        if not tps:
            return CommitResult(ok=True, retriable=False)
        if asynchronous:
            try:
                self._consumer.commit(offsets=tps, asynchronous=True)
            except KafkaException as exc:
                return CommitResult(ok=False, retriable=True, error=str(exc))
            return CommitResult(ok=True, retriable=False)
        try:
            result = self._consumer.commit(offsets=tps, asynchronous=False)
        except KafkaException as exc:
            err = exc.args[0] if exc.args else None
            code = err.code() if err is not None and hasattr(err, "code") else None
            fenced = code in {KafkaError.ILLEGAL_GENERATION, KafkaError.UNKNOWN_MEMBER_ID,
                              KafkaError.REBALANCE_IN_PROGRESS, KafkaError._NO_OFFSET}
            return CommitResult(ok=False, retriable=not fenced, error=str(exc))
        failed = [tp for tp in (result or []) if tp.error is not None]
        if failed:
            return CommitResult(ok=False, retriable=True, error=str(failed[0].error))
        return CommitResult(ok=True, retriable=False)

    def close(self) -> None:
        try:
            self._consumer.close()
        except Exception as exc:  # noqa: BLE001 - closing must not raise during shutdown
            logger.warning("closing consumer: %s", exc)


@dataclass(frozen=True)
class Incarnation:
    """What identifies the broker's log: its cluster id and the id of each topic (None: the topic is missing,
    "" : the broker gives no topic ids)."""

    cluster_id: str | None
    topic_ids: tuple[tuple[str, str | None], ...]

    def missing(self) -> list[str]:
        return [t for t, tid in self.topic_ids if tid is None]

    def changed_from(self, base: "Incarnation") -> str | None:
        """Why this is not the log ``base`` described (None: the same, as far as can be told)."""
        if base.cluster_id and self.cluster_id and base.cluster_id != self.cluster_id:
            return f"cluster id changed from {base.cluster_id} to {self.cluster_id}"
        now = dict(self.topic_ids)
        for topic, old in base.topic_ids:
            if old is None or topic not in now:
                continue
            new = now[topic]
            if new is None:
                return f"topic {topic} is gone"
            if old and new and old != new:
                return f"topic {topic} was re-created (id {old} -> {new})"
        return None


class BrokerWatch:
    """Reads the broker's ``Incarnation`` (one metadata request and one DescribeTopics): a changed cluster id,
    a topic that disappeared or was re-created tells that the committed offsets of the old log mean nothing
    on this one (Tansu's memory engine after a restart, a topic deleted and created again)."""

    def __init__(self, cfg: KafkaConfig, topics: Sequence[str]) -> None:
        from confluent_kafka.admin import AdminClient

        self.cfg = cfg
        self.topics = list(topics)
        conf = _client_logging(cfg.admin_config())
        conf["error_cb"] = lambda err: logger.debug("kafka watch: %s", err)
        self._admin = AdminClient(conf)

    def incarnation(self, timeout: float = 2.0) -> Incarnation:
        """The broker's current incarnation; ``BusError`` when it does not answer within ``timeout``."""
        from confluent_kafka import KafkaException, TopicCollection

        try:
            md = self._admin.list_topics(timeout=timeout)
        except KafkaException as exc:
            raise BusError(f"cannot reach Kafka at {self.cfg.bootstrap}: {exc}") from exc
        present = [t for t in self.topics if t in md.topics and md.topics[t].error is None]
        ids: dict[str, str | None] = {t: None for t in self.topics}
        for t in present:
            ids[t] = ""
        if present:
            try:
                futures = self._admin.describe_topics(TopicCollection(present), request_timeout=timeout)
                for name, fut in futures.items():
                    try:
                        desc = fut.result(timeout=timeout)
                        tid = getattr(desc, "topic_id", None)
                        ids[name] = str(tid) if tid is not None else ""
                    except KafkaException as exc:
                        err = exc.args[0] if exc.args else None
                        if err is not None and hasattr(err, "code") and err.code() == 3:  # UNKNOWN_TOPIC_OR_PART
                            ids[name] = None
            except (KafkaException, ValueError, TypeError) as exc:  # no DescribeTopics: cluster id only
                logger.debug("describe topics: %s", exc)
        return Incarnation(cluster_id=md.cluster_id, topic_ids=tuple((t, ids[t]) for t in self.topics))


class TailFollower:
    """Reads the last ``window`` messages per partition of ``topics`` and follows on.

    Assign-only (no group join, nothing committed), so every instance sees all
    partitions. New partitions are picked up on ``refresh()``.
    """

    def __init__(self, cfg: KafkaConfig, topics: Sequence[str], window: int = 1000, **overrides: Any) -> None:
        from confluent_kafka import Consumer

        self.cfg = cfg
        self.topics = list(topics)
        self.window = max(0, int(window))
        conf = cfg.consumer_config(f"{cfg.client_id}-tail-{secrets.token_hex(6)}", **overrides)
        conf["error_cb"] = lambda err: logger.debug("kafka tail: %s", err)
        self._consumer = Consumer(_client_logging(conf))
        self._assigned: set[tuple[str, int]] = set()

    def refresh(self, timeout: float = 5.0) -> bool:
        """Assign partitions not yet followed; True when all topics exist."""
        from confluent_kafka import OFFSET_BEGINNING, KafkaException, TopicPartition

        try:
            md = self._consumer.list_topics(timeout=timeout)
        except KafkaException as exc:
            logger.debug("tail metadata: %s", exc)
            return False
        new: list[Any] = []
        complete = True
        for topic in self.topics:
            tmd = md.topics.get(topic)
            if tmd is None or tmd.error is not None or not tmd.partitions:
                complete = False
                continue
            for p in tmd.partitions:
                if (topic, p) not in self._assigned:
                    # OFFSET_TAIL(n) == -2000 - n: n messages before the end.
                    offset = (-2000 - self.window) if self.window else OFFSET_BEGINNING
                    new.append(TopicPartition(topic, p, offset))
        if new:
            self._consumer.incremental_assign(new)
            self._assigned |= {(tp.topic, tp.partition) for tp in new}
        return complete

    def poll_batch(self, max_messages: int = 500, timeout: float = 0.5) -> list[Record]:
        out: list[Record] = []
        if not self._assigned:
            time.sleep(min(timeout, 0.2))
            return out
        for msg in self._consumer.consume(num_messages=max_messages, timeout=timeout):
            if msg.error() is None:
                out.append(_to_record(msg))
        return out

    def close(self) -> None:
        try:
            self._consumer.close()
        except Exception as exc:  # noqa: BLE001
            logger.debug("closing tail consumer: %s", exc)


# --------------------------------------------------------------------------- CLI


def _cmd_topics(args: argparse.Namespace) -> int:
    cfg = KafkaConfig.from_env(bootstrap=args.bootstrap)
    if args.delete:
        delete_topics(cfg)
        print(f"deleted {cfg.all_topics}")
    else:
        created = ensure_topics(cfg, partitions=args.partitions)
        print(json.dumps({"topics": cfg.all_topics, "created": created}))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mlpipe kafka", description=__doc__.split("\n\n")[0])
    parser.add_argument("--log-level", default=None, help="(default $MLPIPE_LOG_LEVEL or INFO)")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("topics", help="create (or --delete) the pipeline topics; connection from MLPIPE_KAFKA_*")
    p.add_argument("--bootstrap", default=None, help="override MLPIPE_KAFKA_BOOTSTRAP")
    p.add_argument("--partitions", type=int, default=None)
    p.add_argument("--delete", action="store_true")
    p.set_defaults(func=_cmd_topics)
    args = parser.parse_args(argv)
    from tasks.logs import setup_logging

    setup_logging(args.log_level)
    try:
        return args.func(args)
    except (BusError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
