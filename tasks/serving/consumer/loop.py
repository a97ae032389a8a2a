"""The consumer loop (``StreamConsumer``): one member of the consumer group on ``frames``.

1. poll a micro-batch (``--max-batch`` messages or ``--max-wait-ms``) and make the cheap checks of each
   frame (``records.check_frames``: headers, key, frame id, then size, content type and magic bytes
   against the model spec; no decoding);
2. one Triton call per micro-batch (``backend``) with the encoded frames, ``--inflight`` micro-batches at
   Triton at once; Triton's preprocess model decodes them, and a frame it cannot use comes back with a
   non-empty ``FRAME_ERROR`` (``<reason>: <detail>``): that frame becomes a dead letter with that reason,
   the others of the batch predictions;
3. produce the predictions to ``predictions`` and the poison frames to ``frames.dlq``, and wait for
   the broker's acknowledgement of every message of the batch (failed ones are produced again);
4. upsert the selected predictions into Qdrant (point id = frame id);
5. commit the batch's offsets only after 3 and 4 succeeded (``offsets``): asynchronously, in batch
   order, at most every ``--commit-interval-ms`` and whenever the loop has nothing else in hand,
   before fetching pauses for a Triton outage and when partitions are revoked; the last offsets again
   synchronously at shutdown.

At-least-once with idempotent sinks: a crash between 3 and 5 redelivers the batch; Qdrant keeps one
point per frame id, ``predictions`` may carry a duplicate (consumers of it key by frame id).

Pipelined: while batch k+1 is checked and sent to Triton, batch k's predictions are produced and
batch k-1's acknowledgements are awaited and its offsets committed. With batches in hand the loop
takes only the frames already fetched (no wait). Nothing after a batch that could not be finished is
committed.

Faults: Triton down or slower than ``--triton-timeout`` -> the partitions are paused (``poll`` keeps
being called, so the member stays in the group and rebalances are served), the batch is retried with
backoff (``backoff``) and nothing is committed past it; fetching resumes when Triton answers. A
failing sink or commit is retried the same way; the process never exits for it. SIGTERM (``stop()``)
-> stop fetching, finish the batches in hand within ``--drain-timeout`` (no wait outlasts it, also
while Triton or the broker hangs), commit, leave the group; the final commit and leaving the group
get ~1.5 s more and are then abandoned (``abandoned``: the uncommitted frames are redelivered).

No poison pill, no endless hold: every message read ends in a prediction or a dead letter.
* A frame whose headers or key are above their limits is a dead letter (``oversize_headers``); a dead
  letter never exceeds ``max_message_bytes`` (the producer's ``message.max.bytes``): original headers
  that do not fit are dropped (``headers_dropped``) and a value that does not fit is stored in the
  object store (``tasks.contracts.layout.dlq_original_prefix``) and replaced by a pointer
  (``original``). A prediction above the limit becomes a dead letter (``undeliverable``).
* A message the broker refuses for good (MSG_SIZE_TOO_LARGE, ...) is replaced by a dead letter, then
  by a minimal one, then dropped with an error log: it is never retried as it is.
* A permanent Triton error (``InferenceRejected``) is bisected (``bisect``): the frames that fail
  alone are dead letters (``inference_failed``). When every frame fails alone (the model rejects
  everything) the batch is held like an outage, but for at most ``reject_hold_s``.
* A batch held by a Triton outage is dead-lettered (``inference_unavailable``) after ``max_hold_s``
  (default 600 s; 0: wait for ever); a Qdrant upsert failing that long is given up (Qdrant is the
  secondary, sampled index: the predictions are in Kafka).
* Every bound that is hit counts in ``mlpipe_consumer_bounds_hit_total{bound}`` and logs its reason.
  The one hold without a bound is the broker itself being down: nothing can be written or dead-lettered
  without it; the consumer is then unready (``acks_ok`` false), paused, and retries with backoff.

Broker incarnations: a ``BrokerWatch`` thread reads the broker's cluster id and topic ids every
``broker_check_s``; a change (Tansu's memory engine restarted, a topic deleted and created again, a
different cluster behind the address) or offsets that go back while a partition stays assigned mean
the old offsets are meaningless on this log. The consumer then drops the batches in hand and every
offset it confirmed (nothing of the old log is ever committed to the new one: a commit is sent only
while the incarnation it was confirmed in is verified), re-creates the topics (unless
``--no-create-topics``), seeks its partitions to the group's offsets on the new log (none: its
start), writes through a fresh producer (a new idempotent producer id) and goes on; librdkafka
re-joins the group on the new coordinator by itself. On a real Kafka cluster the log
survives a broker restart: cluster and topic ids stay, nothing is reset, the member re-joins and
resumes from its committed offsets (at most the uncommitted tail is redelivered). /readyz is 503 while
the member holds no partitions, is paused, gets no acknowledgements, or the broker is unreachable or
being re-joined.

The model spec (``spec``, default ``load_settings().model_spec(cfg.model)``, resolved when the consumer is made:
a missing or invalid spec raises ``SpecError`` there) gives the frame checks and the class names of the
predictions. A pipeline (``cfg.model`` names ``models/<name>/pipeline.yaml``; ``pipeline``, by default found
by ``pipeline.pipeline_serving``) is served the same way by its one Triton model: the frames are checked
against its detector's spec, the predictions carry the boxes, the count and the read-out
(``pipeline.pipeline_prediction_records``), and safe rollout is off (it follows single models only).

Seams (tests): ``backend`` is any ``InferenceBackend``; ``consumer_factory`` / ``producer_factory``
build the Kafka ends (``FrameSource`` / ``ResultSink``, by default ``BatchConsumer`` / ``BusProducer``);
``vectors`` is any ``VectorSink``; ``rng`` draws the backoff jitter.
"""

from __future__ import annotations

import gc
import json
import logging
import random
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FuturesTimeout
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Protocol, Sequence

from tasks.contracts.messages import R_INFERENCE_FAILED, R_INFERENCE_UNAVAILABLE, R_UNDELIVERABLE, FrameRejected
from tasks.serving.consumer.backend import InferenceBackend, InferenceRejected, InferenceUnavailable
from tasks.serving.consumer.backoff import Backoff
from tasks.serving.consumer.bisect import bisect_infer
from tasks.serving.consumer.config import StreamConfig
from tasks.serving.consumer.offsets import OffsetTracker
from tasks.serving.consumer.records import (
    Message,
    check_frames,
    dead_letter_plan,
    dead_letter_records,
    frame_errors,
    iso,
    message_size,
    original_record_json,
    prediction_records,
)
from tasks.serving.consumer.records import now as utc_now
from tasks.serving.consumer.telemetry import HealthServer, Metrics
from tasks.tracing import NO_BATCH, start_batch

if TYPE_CHECKING:  # pragma: no cover
    from tasks.adapters.kafka import CommitResult, KafkaConfig, Record
    from tasks.adapters.qdrant import PredictionPoint
    from tasks.contracts.spec import ModelSpec
    from tasks.serving.consumer.pipeline import PipelineServing
    from tasks.serving.consumer.rollout import RolloutRouter

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- what the loop needs


class FrameSource(Protocol):
    """The frames end (``tasks.adapters.kafka.BatchConsumer``)."""

    assigned_once: bool
    in_group: bool

    @property
    def assignment(self) -> list[tuple[str, int]]: ...

    @property
    def paused(self) -> bool: ...

    def poll_batch(self, max_messages: int, timeout: float) -> list["Record"]: ...

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def rewind(self, offsets: Mapping[tuple[str, int], int]) -> None: ...

    def reposition(self) -> dict[tuple[str, int], int]: ...

    def commit(self, offsets: Mapping[tuple[str, int], int], asynchronous: bool = False) -> "CommitResult": ...

    def lag(self) -> dict[tuple[str, int], int]: ...

    def close(self) -> None: ...


class ResultSink(Protocol):
    """The predictions / dead-letter end (``tasks.adapters.kafka.BusProducer``).

    ``produce_batch`` returns a ticket with ``pending`` and ``failed`` (``DeliveryTicket``); ``wait``
    raises ``tasks.adapters.kafka.DeliveryError`` when some message was not acknowledged."""

    def produce_batch(self, messages: Sequence[Message]) -> Any: ...

    def wait(self, ticket: Any, timeout: float = 30.0, give_up: Callable[[], bool] | None = None) -> None: ...

    def close(self, timeout: float = 5.0) -> None: ...


class VectorSink(Protocol):
    """The Qdrant end (``tasks.adapters.qdrant.VectorStore``)."""

    def upsert_predictions(self, points: Iterable["PredictionPoint"]) -> int: ...


class OriginalStore(Protocol):
    """Where oversize dead-lettered originals go (``tasks.adapters.storage`` stores)."""

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None: ...


class BrokerReset(Exception):
    """The broker lost its log (see the module doc): raised from the waits, handled by the main loop."""


def tune_gc() -> None:
    """Everything allocated before the loop starts (libraries, clients, Qdrant's collection) lives as long as
    the process: move it out of the collector's reach, and collect the young generation less often. Full
    collections otherwise walked ~1M long-lived objects and stalled the loop 80-110 ms."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


# --------------------------------------------------------------------------- the consumer


def _failed(failed: Sequence[tuple[int, str]], reason: str) -> list[tuple[int, FrameRejected]]:
    """Triton's errors for batch positions -> dead letters of ``reason`` (``inference_failed`` or
    ``inference_unavailable``)."""
    what = "Triton rejected the frame" if reason == R_INFERENCE_FAILED else "Triton was unavailable too long"
    return [(j, FrameRejected(reason, f"{what}: {err}")) for j, err in failed]


@dataclass
class _Batch:
    records: list["Record"]
    good: list[int]  # indexes into records
    frames: list[bytes]  # the encoded frames of records[good[j]], sent to Triton
    rejected: list[tuple[int, FrameRejected]]
    frame_ids: list[str]
    polled_at: float
    seq: int = 0  # the offset tracker's ticket
    polled_wall: float = 0.0  # epoch seconds, for the per-frame latency breakdown
    answered_wall: float = 0.0
    processed_wall: float = 0.0  # the loop took Triton's answer
    future: Future | None = None
    submitted_at: float = 0.0
    infer_s: float = 0.0
    messages: list = field(default_factory=list)
    points: list = field(default_factory=list)
    captured: list = field(default_factory=list)
    ticket: Any = None
    version: Any = ""  # the served classifier version, read when Triton answered; a list (per frame) when split
    route: list | None = None  # safe rollout: per frame, True when the candidate answers it (None: the champion)
    routed: bool = False  # the rollout router answered (and counted) this batch
    fallback: int = 0  # rounds of replacing messages the broker refused for good
    trace: Any = NO_BATCH  # its spans (tasks.tracing.BatchTrace; a no-op while tracing is off)


class StreamConsumer:
    """The consumer loop. ``run()`` returns when stopped (``stop()``, SIGTERM) or idle long enough."""

    def __init__(self, kafka: "KafkaConfig", cfg: StreamConfig, backend: InferenceBackend | None = None,
                 vectors: VectorSink | None = None, *,
                 consumer_factory: Callable[..., FrameSource] | None = None,
                 producer_factory: Callable[["KafkaConfig"], ResultSink] | None = None,
                 rng: random.Random | None = None, store: OriginalStore | None = None,
                 watch_factory: Callable[..., Any] | None = None, spec: "ModelSpec | None" = None,
                 rollout: "RolloutRouter | None" = None, pipeline: "PipelineServing | None | bool" = True) -> None:
        # pipeline: True (default) = found by cfg.model's name (its pipeline.yaml); None / False = a single model;
        # a PipelineServing = that one. spec None: the pipeline's detector spec, else the model's
        if pipeline is True or spec is None:
            from tasks.config import load_settings
            from tasks.serving.consumer.pipeline import pipeline_serving

            settings = load_settings()
            if pipeline is True:
                pipeline = pipeline_serving(cfg.model, settings.models_dir)  # SpecError (bad input) names the problem
            if spec is None:
                spec = pipeline.frames if pipeline else settings.model_spec(cfg.model)
        self.pipeline: "PipelineServing | None" = pipeline or None
        if self.pipeline is not None and rollout is not None:
            logger.info("safe rollout is off: %s is a pipeline, served as one Triton model; a rollout follows "
                        "single models only (a pipeline changes by `mlpipe pipeline deploy` / `rollback`)", cfg.model)
            rollout = None
        self.kafka = kafka
        self.cfg = cfg
        self.spec = spec  # the frames accepted: a pipeline's detector spec
        self.metrics = Metrics()
        self.backend = backend
        self.rollout = rollout  # safe rollout: routes frames to a candidate lane (tasks/serving/consumer/rollout.py)
        if rollout is not None:
            rollout.metrics = self.metrics
            rollout.build_shadow = self._shadow_messages
        self.vectors = vectors
        self._consumer_factory = consumer_factory
        self._producer_factory = producer_factory
        self._rng = rng if rng is not None else random.Random()
        self._stop = threading.Event()
        self._stop_deadline: float | None = None
        self._heartbeat = time.monotonic()
        self._triton_ready = False
        self._consumer: FrameSource | None = None
        self._producer: ResultSink | None = None
        self._infer_pool: ThreadPoolExecutor | None = None
        self._last_message = time.monotonic()
        self.stats = {"predicted": 0, "dead_letter": 0, "batches": 0, "commits": 0, "triton_errors": 0,
                      "qdrant_points": 0, "rewinds": 0, "busy_s": 0.0, "broker_resets": 0, "bounds_hit": 0,
                      "dropped": 0}
        self.max_message_bytes = int(cfg.max_message_bytes or getattr(kafka, "max_message_bytes", 0) or 1_000_000)
        self._store = store
        self._watch_factory = watch_factory
        self._watch: Any = None
        self._inc_lock = threading.Lock()
        self._inc_gen = 0
        self._incarnation: Any = None  # the broker's Incarnation the current consumer joined
        self._reset_reason: str | None = None  # set by the watch thread: the broker lost its log
        self._broker_state = "unknown"  # same | changed | unreachable | unknown
        self._unreachable = 0  # consecutive failed checks
        self._resetting = False
        self._acks_failing = False
        self._next_pos: dict[tuple[str, int], int] = {}  # per assigned partition, the offset expected next
        self._make_producer: Callable[["KafkaConfig"], ResultSink] | None = None
        self.http: HealthServer | None = None
        self._first_batch_at: float | None = None
        self._last_infer_ok = 0.0
        self.offsets = OffsetTracker()  # batches in hand, confirmed and committed offsets, frames to re-read
        self._last_commit = 0.0
        self._last_lag = -1e9  # when the lag gauges were last updated
        self.abandoned = False  # shutdown gave up on the broker: the process must not wait for librdkafka
        # per frame, if recorded: captured_at (epoch), then seconds from it until: both sinks written, the
        # loop polled the frame, Triton answered, the loop took the answer
        self.latencies: list[tuple[float, float, float, float, float]] = []
        # main-thread seconds per step of the loop (in --stats-json: where the time goes)
        self.stage_s = dict.fromkeys(("poll", "check", "wait_triton", "build_produce", "wait_kafka_acks",
                                      "qdrant", "commit"), 0.0)

    def _backoff(self) -> Backoff:
        return Backoff(self.cfg.backoff_initial_s, self.cfg.backoff_max_s, self.cfg.backoff_jitter, self._rng)

    # ----------------------------------------------------------------- health
    def live(self) -> tuple[bool, dict]:
        age = time.monotonic() - self._heartbeat
        return age < 60.0, {"loop_age_s": round(age, 3)}

    def ready(self) -> tuple[bool, dict]:
        c = self._consumer
        partitions = len(c.assignment) if c is not None else 0
        assigned = bool(c is not None and c.in_group and partitions > 0)
        paused = bool(c is not None and c.paused)
        broker_ok = not self._resetting and self._broker_state != "changed" and self._unreachable < 2
        detail = {"assigned": assigned, "partitions": partitions, "triton_ready": self._triton_ready,
                  "paused": paused, "acks_ok": not self._acks_failing, "broker": self._broker_state,
                  "rejoining": self._resetting}
        ok = (assigned and not paused and self._triton_ready and not self._acks_failing and broker_ok
              and not self._stop.is_set())
        return ok, detail

    def _bound(self, bound: str, message: str, *args: Any) -> None:
        """A bound was hit: count it and log why."""
        self.metrics.bounds_hit.labels(bound).inc()
        self.stats["bounds_hit"] += 1
        logger.warning("bound %s hit: " + message, bound, *args)

    def stop(self) -> None:
        if not self._stop.is_set():
            logger.info("stop requested: finishing the batches in hand (at most %.0fs)", self.cfg.drain_timeout_s)
            self._stop_deadline = time.monotonic() + self.cfg.drain_timeout_s
            self._stop.set()

    def _draining_too_long(self) -> bool:
        return self._stop_deadline is not None and time.monotonic() > self._stop_deadline

    def _health_loop(self) -> None:
        while not self._stop.wait(2.0):
            if self.backend is not None:
                self._triton_ready = self.backend.ready()
                if self._triton_ready:
                    self.backend.model_version(max_age_s=2.0)
                    chunk = getattr(self.backend, "max_batch_size", None)
                    if isinstance(chunk, int):
                        self.metrics.model_max_batch.set(chunk)

    # ----------------------------------------------------------------- broker incarnation
    def _check_broker(self, timeout: float = 2.0) -> str | None:
        """Read the broker's incarnation once; returns why it is not the one joined (None: same or unknown)."""
        from tasks.adapters.kafka import BusError

        watch = self._watch
        if watch is None:
            return None
        with self._inc_lock:
            gen, base = self._inc_gen, self._incarnation
        try:
            inc = watch.incarnation(timeout=timeout)
        except BusError as exc:
            with self._inc_lock:
                if gen == self._inc_gen:
                    self._unreachable += 1
                    if self._broker_state != "changed":
                        self._broker_state = "unreachable"
            logger.debug("broker check: %s", exc)
            return None
        with self._inc_lock:
            if gen != self._inc_gen:  # a reset happened meanwhile: this answer belongs to no one
                return None
            self._unreachable = 0
            if base is None:
                self._incarnation = inc
                self._broker_state = "same"
                return None
            why = inc.changed_from(base)
            if why is None:
                if inc.missing() != base.missing():  # a topic that was missing at the start appeared
                    self._incarnation = inc
                if self._broker_state != "changed":
                    self._broker_state = "same"
                return None
            self._broker_state = "changed"
            if self._reset_reason is None:
                self._reset_reason = why
            return why

    def _broker_loop(self) -> None:
        while not self._stop.wait(max(0.05, self.cfg.broker_check_s)):
            try:
                self._check_broker(timeout=min(2.0, max(0.5, self.cfg.broker_check_s * 2)))
            except Exception as exc:  # noqa: BLE001 - the watch must never die
                logger.debug("broker check failed: %s", exc)

    def _commit_allowed(self) -> bool:
        """Commits go only to the log the offsets were confirmed in: verified, and no reset pending."""
        if self._watch is None:
            return True
        return self._broker_state == "same" and self._reset_reason is None and not self._resetting

    def _raise_if_reset(self) -> None:
        if self._reset_reason is not None and not self._stop.is_set():
            raise BrokerReset(self._reset_reason)

    def _reset_broker(self, reason: str, in_hand: int) -> None:
        """The broker lost its log: forget every offset, re-create the topics, re-position the member on the new
        log (the group's offsets there, else the start), and write through a fresh (idempotent) producer.

        The group member itself is kept: librdkafka re-joins the new coordinator by itself, while closing it
        and joining with a new one could leave a half-closed member that still heartbeats and holds the
        group's rebalance (measured on Tansu: no assignment for minutes)."""
        kind = ("offsets_went_back" if "went back" in reason else "cluster_id" if "cluster id" in reason
                else "topic_recreated" if "re-created" in reason else "topic_gone" if "gone" in reason
                else "other")
        self.metrics.broker_resets.labels(kind).inc()
        self.stats["broker_resets"] += 1
        logger.warning("the broker lost its log (%s): dropping %d batch(es) in hand and every offset confirmed "
                       "before (none of them is committed to the new log), re-joining group %s", reason, in_hand,
                       self.cfg.group_id)
        self._resetting = True
        old_producer = self._producer
        self.offsets = OffsetTracker()  # first: a revoke callback meanwhile commits nothing of the old log
        self._next_pos.clear()
        with self._inc_lock:
            self._inc_gen += 1
            self._incarnation = None
            self._broker_state = "unknown"
        if old_producer is not None:  # its producer id and sequence numbers mean nothing to the new log
            closer = threading.Thread(target=old_producer.close, kwargs={"timeout": 0.5}, name="close-producer",
                                      daemon=True)
            closer.start()
            closer.join(2.0)
        if self.cfg.create_topics and not self._ensure_topics():
            return
        assert self._consumer is not None and self._make_producer is not None
        self._producer = self._make_producer(self.kafka)
        with self._inc_lock:
            self._reset_reason = None
        self._check_broker()  # the new log's incarnation
        positions = self._consumer.reposition()
        if positions:
            logger.info("re-positioned on the new log: %s", positions)
        if self._consumer.paused:
            self._consumer.resume()
        self.metrics.paused.set(0)
        self._set_acks_failing(False)
        self._last_message = time.monotonic()
        self._resetting = False

    # ----------------------------------------------------------------- setup
    def _ensure_topics(self) -> bool:
        from tasks.adapters.kafka import BusError, ensure_topics

        backoff = self._backoff()
        while not self._stop.is_set():
            self._heartbeat = time.monotonic()
            try:
                ensure_topics(self.kafka, timeout=3.0)
                if self.rollout is not None:
                    from tasks.contracts.messages import PREDICTIONS_SHADOW

                    ensure_topics(self.kafka, [self.kafka.topic(PREDICTIONS_SHADOW)], timeout=3.0)
                return True
            except BusError as exc:
                msg = str(exc)
                if "AUTHORIZATION" in msg.upper() or "not authorized" in msg.lower():
                    logger.warning("cannot create topics (%s); assuming they are managed elsewhere", msg)
                    return True
                delay = backoff.next()
                logger.warning("broker not reachable yet (%s); retrying in %.1fs", msg, delay)
                self._stop.wait(delay)
        return False

    def _open(self) -> None:
        consumer_factory, producer_factory = self._consumer_factory, self._producer_factory
        if consumer_factory is None or producer_factory is None:
            from tasks.adapters.kafka import BatchConsumer, BusProducer

            consumer_factory = consumer_factory or BatchConsumer
            producer_factory = producer_factory or BusProducer
        overrides = {"session.timeout.ms": self.cfg.session_timeout_ms,
                     "heartbeat.interval.ms": max(100, self.cfg.session_timeout_ms // 5),
                     "fetch.wait.max.ms": max(5, min(100, self.cfg.max_wait_ms)),
                     # a topic created (again) after the subscription is seen within 3 s, not librdkafka's 5 min:
                     # until then the member would hold no partition of it
                     "topic.metadata.refresh.interval.ms": 3000,
                     **self.cfg.kafka_overrides}

        def assigned(_partitions: list[tuple[str, int]]) -> None:
            self._last_message = time.monotonic()  # idle time counts from the (re)assignment
            self._next_pos.clear()  # positions come from the group's offsets now

        if self._watch is None and self.cfg.broker_check_s > 0:
            if self._watch_factory is not None:
                self._watch = self._watch_factory(self.kafka, [self.kafka.frames_topic])
            elif self._consumer_factory is None:  # the real Kafka ends: watch the real broker
                from tasks.adapters.kafka import BrokerWatch

                self._watch = BrokerWatch(self.kafka, [self.kafka.frames_topic])
        self._check_broker()  # the incarnation this membership belongs to
        self._consumer = consumer_factory(self.kafka, self.cfg.group_id, [self.kafka.frames_topic],
                                          on_assign=assigned, on_revoke=self._revoked, stats_interval_ms=2000,
                                          **overrides)
        self._make_producer = producer_factory
        self._producer = producer_factory(self.kafka)
        if self.rollout is not None:
            self.rollout.produce = self._producer.produce_batch  # shadow answers: queued, never awaited

    # ----------------------------------------------------------------- batch preparation
    def _prepare(self, records: list["Record"]) -> _Batch:
        polled_wall = time.time()  # before the checks: the latency log's "polled" step ends here
        d = check_frames(records, self.spec, self.cfg.max_frame_bytes)
        batch = _Batch(records=records, good=d.good, frames=d.frames, rejected=d.rejected, frame_ids=d.frame_ids,
                       polled_at=time.monotonic(), polled_wall=polled_wall, seq=self.offsets.take(records),
                       trace=start_batch(records, d.frame_ids, model=self.cfg.model, started_at=polled_wall))
        if self.rollout is not None and self.rollout.active:
            batch.route = self.rollout.route(records, d.good, d.frame_ids)
        return batch

    def _submit(self, batch: _Batch) -> None:
        if batch.frames and self.backend is not None:
            assert self._infer_pool is not None
            batch.submitted_at = time.monotonic()
            batch.future = self._infer_pool.submit(batch.trace.run(self._timed_infer), batch.frames, batch)

    def _await(self, future: Future | None) -> Any:
        """``future.result()``; raises ``FuturesTimeout`` once a stop request's drain budget is spent (a hung
        Triton holds a call for up to ``--triton-timeout``: SIGTERM must not wait for it)."""
        assert future is not None, "a batch with frames needs a Triton backend"
        while True:
            try:
                return future.result(timeout=0.25)
            except FuturesTimeout:
                if self._stop.is_set() and self._draining_too_long():
                    raise

    def _timed_infer(self, frames: Sequence[bytes], batch: _Batch | None = None) -> tuple[dict, float, float, Any]:
        """Triton's outputs, the seconds the call took, when it returned (epoch) and the served version then.

        The version is read right after the answer, cached at most ``version_max_age_s`` (default 0.25 s), so
        a prediction's label follows a deploy within that instead of the health thread's 2 s. During a
        rollout the router answers (``batch.route``: the candidate's frames; the version is then one per
        frame); a bisection's sub-batches (``batch`` None) go to the champion."""
        assert self.backend is not None
        if batch is not None and self.rollout is not None and self.rollout.active:
            ctx = {"records": batch.records, "good": batch.good, "frame_ids": batch.frame_ids}
            out, secs, version = self.rollout.infer(self.backend, frames, batch.route, ctx)
            batch.routed = True
            return out, secs, time.time(), version
        t0 = time.perf_counter()
        out = self.backend.infer(frames)
        secs, answered = time.perf_counter() - t0, time.time()
        try:
            version = self.backend.model_version(max_age_s=self.cfg.version_max_age_s)
        except Exception:  # noqa: BLE001 - an unknown version never fails a batch
            version = self.backend.version
        return out, secs, answered, version

    # ----------------------------------------------------------------- waiting while paused
    def _idle_poll(self, seconds: float) -> None:
        """Serve the consumer (rebalances, membership) for ``seconds`` without taking new work."""
        assert self._consumer is not None
        deadline = time.monotonic() + seconds
        while True:
            self._heartbeat = time.monotonic()
            left = deadline - time.monotonic()
            if left <= 0:
                return
            extra = self._consumer.poll_batch(100, min(left, 0.1))
            self.offsets.refetched(extra)  # fetched before the pause took effect: re-read them later
            self._update_lag()
            self._raise_if_reset()
            if self._stop.is_set() and self._draining_too_long():
                return

    def _resume(self) -> None:
        assert self._consumer is not None
        rewind = self.offsets.take_rewind()
        if rewind:
            self._consumer.rewind(rewind)
            self.stats["rewinds"] += len(rewind)
            for tp, off in rewind.items():
                self._next_pos[tp] = off
        if self._consumer.paused:
            self._consumer.resume()
            self.metrics.paused.set(0)

    # ----------------------------------------------------------------- finishing a batch
    def _results(self, batch: _Batch) -> dict | None:
        """Triton outputs for the batch, retrying (paused) until Triton answers; None when giving up.

        A permanent error (``InferenceRejected``) is bisected: frames that fail alone become dead letters
        (``inference_failed``) and the outputs cover the others. When every frame fails alone, the batch is
        held like an outage for at most ``reject_hold_s``, then its frames are dead letters."""
        assert self._consumer is not None
        if not batch.frames:
            return {}
        backoff = self._backoff()
        attempt = 0
        rejected_since: float | None = None
        held_since: float | None = None
        while True:
            try:
                if batch.future is None:  # a retry: through the pool too, so a stop request need not wait out
                    self._submit(batch)   # Triton's timeout
                out, secs, batch.answered_wall, batch.version = self._await(batch.future)
                batch.future = None
                batch.infer_s = secs
                self._answered(attempt)
                return out
            except FuturesTimeout:  # stopping, and the drain budget ran out while Triton had not answered
                return None
            except InferenceRejected as exc:
                batch.future = None
                self.metrics.inference_rejected.inc()
                try:
                    found = self._bisect(batch, str(exc))
                except FuturesTimeout:
                    return None
                except InferenceUnavailable as exc2:
                    unavailable: Exception = exc2
                else:
                    if found.ok:
                        logger.warning("Triton rejected a batch of %d frame(s) (%s); bisected in %d call(s): %d "
                                       "frame(s) at fault go to the dead-letter topic", len(batch.good), exc,
                                       found.calls, len(found.failed))
                        self._reject_frames(batch, _failed(found.failed, R_INFERENCE_FAILED))
                        self._answered(attempt)
                        return found.outputs
                    now = time.monotonic()
                    rejected_since = now if rejected_since is None else rejected_since
                    if now - rejected_since >= self.cfg.reject_hold_s:
                        self._bound("inference_rejected", "Triton rejected every frame of a batch of %d alone for "
                                    "%.0fs (%s): dead-lettering them as %s", len(batch.good),
                                    now - rejected_since, exc, R_INFERENCE_FAILED)
                        self._reject_frames(batch, _failed([(j, str(exc)) for j in range(len(batch.good))],
                                                           R_INFERENCE_FAILED))
                        self._resume()
                        return {}
                    unavailable = InferenceUnavailable(f"Triton rejects every frame alone: {exc}")
                if not self._hold(batch, unavailable, backoff, attempt := attempt + 1):
                    return None
            except InferenceUnavailable as exc:
                stale = batch.future is not None and batch.submitted_at < self._last_infer_ok
                batch.future = None
                if stale:  # sent during an outage that is over by now: retry at once
                    continue
                now = time.monotonic()
                held_since = now if held_since is None else held_since
                if self.cfg.max_hold_s > 0 and now - held_since >= self.cfg.max_hold_s:
                    self._bound("triton_hold", "Triton unavailable for %.0fs (%s): the %d frame(s) held are "
                                "dead-lettered as %s", now - held_since, exc, len(batch.good),
                                R_INFERENCE_UNAVAILABLE)
                    self._reject_frames(batch, _failed([(j, str(exc)) for j in range(len(batch.good))],
                                                       R_INFERENCE_UNAVAILABLE))
                    return {}
                if not self._hold(batch, exc, backoff, attempt := attempt + 1):
                    return None

    def _answered(self, attempt: int) -> None:
        self._last_infer_ok = time.monotonic()
        self._triton_ready = True
        if self.backend is not None and not self.backend.version:
            self.backend.model_version(max_age_s=0.0)
        if attempt:
            logger.info("Triton answers again after %d failed attempt(s)", attempt)
        self._resume()

    def _hold(self, batch: _Batch, exc: Exception, backoff: Backoff, attempt: int) -> bool:
        """Triton cannot process the batch now: pause fetching and wait the next backoff. False: giving up."""
        assert self._consumer is not None
        self._triton_ready = False
        self.metrics.triton_errors.inc()
        self.stats["triton_errors"] += 1
        if not self._consumer.paused:
            self._consumer.pause()
            self.metrics.paused.set(1)
            self._commit_confirmed(force=True)  # the batches before this one are done
        delay = backoff.next()
        log = logger.warning if attempt == 1 or attempt % 10 == 0 else logger.debug
        log("Triton unavailable (%s); %d frame(s) held, fetching paused, retry %d in %.1fs",
            exc, len(batch.good), attempt, delay)
        if self._stop.is_set() and self._draining_too_long():
            return False
        self._idle_poll(delay)
        return not (self._stop.is_set() and self._draining_too_long())

    def _bisect(self, batch: _Batch, error: str) -> Any:
        """``bisect_infer`` over the batch's frames, each call through the pool (a stop request is honoured)."""
        assert self._infer_pool is not None and batch.frames
        answered: list[tuple[float, float, str]] = []

        def infer(frames: Sequence[bytes]) -> dict:
            assert self._infer_pool is not None
            out, secs, wall, version = self._await(self._infer_pool.submit(self._timed_infer, frames))
            answered.append((secs, wall, version))
            return out

        found = bisect_infer(infer, batch.frames, error)
        if answered:
            batch.infer_s = sum(a[0] for a in answered)
            batch.answered_wall = max(a[1] for a in answered)
            batch.version = answered[-1][2]
        return found

    def _reject_frames(self, batch: _Batch, failed: Sequence[tuple[int, FrameRejected]]) -> list[int]:
        """Move the frames at positions ``failed`` (into ``batch.good``) to the batch's dead letters; returns the
        positions kept (into the old ``batch.good``)."""
        gone = {j for j, _ in failed}
        for j, rej in failed:
            batch.rejected.append((batch.good[j], rej))
        batch.rejected.sort(key=lambda r: r[0])
        keep = [j for j in range(len(batch.good)) if j not in gone]
        batch.good = [batch.good[j] for j in keep]
        batch.frame_ids = [batch.frame_ids[j] for j in keep]
        batch.frames = [batch.frames[j] for j in keep]
        if isinstance(batch.version, list):
            batch.version = [batch.version[j] for j in keep]
        if batch.route is not None:
            batch.route = [batch.route[j] for j in keep]
        return keep

    def _retry(self, what: str, sink: str, fn: Callable[[], Any], bounded: bool = False) -> bool:
        """Call ``fn`` until it succeeds (fetching paused meanwhile); False only when draining too long.

        ``bounded``: after ``max_hold_s`` of failures give up on ``fn`` (a bound: counted, logged) and go on."""
        assert self._consumer is not None
        backoff: Backoff | None = None  # made on the first failure: the common path stays allocation-free
        attempt = 0
        since = 0.0
        while True:
            try:
                fn()
                if attempt:
                    logger.info("%s succeeded after %d failed attempt(s)", what, attempt)
                    self._resume()
                return True
            except Exception as exc:  # noqa: BLE001 - every sink failure is retried
                attempt += 1
                since = since or time.monotonic()
                if bounded and self.cfg.max_hold_s > 0 and time.monotonic() - since >= self.cfg.max_hold_s:
                    self._bound(f"{sink}_hold", "%s still failing after %.0fs (%d attempts, %s): going on without it",
                                what, time.monotonic() - since, attempt, exc)
                    self._resume()
                    return True
                if not self._consumer.paused:
                    self._consumer.pause()
                    self.metrics.paused.set(1)
                self.metrics.write_errors.labels(sink).inc()
                if backoff is None:
                    backoff = self._backoff()
                delay = backoff.next()
                log = logger.warning if attempt == 1 or attempt % 10 == 0 else logger.debug
                log("%s failed (attempt %d): %s; retrying in %.1fs", what, attempt, exc, delay)
                if self._stop.is_set() and self._draining_too_long():
                    return False
                self._idle_poll(delay)

    def _write(self, batch: _Batch) -> bool:
        """Triton results -> predictions and dead letters produced (not yet confirmed). False: giving up."""
        assert self._consumer is not None and self._producer is not None
        t0 = time.perf_counter()
        outputs = self._results(batch)
        t1 = time.perf_counter()
        self.stage_s["wait_triton"] += t1 - t0
        if outputs is None:
            self._bound("drain_timeout", "giving up on a batch of %d frame(s) at shutdown; it is not committed and "
                        "will be redelivered", len(batch.records))
            return False
        unusable = frame_errors(outputs)  # frames Triton's preprocess model could not use: dead letters
        if unusable:
            keep = self._reject_frames(batch, unusable)
            outputs = {name: value[keep] for name, value in outputs.items()}
        self.metrics.batch_size.observe(len(batch.records))
        processed = utc_now()
        batch.processed_wall = processed.timestamp()
        # the version read when Triton answered this batch (the health thread's is up to 2 s old)
        version = batch.version or (self.backend.version if self.backend is not None else "")
        if not batch.routed and batch.good:
            self.metrics.version_frames.labels(version or "?", "champion").inc(len(batch.good))
        built = self._predictions(batch, outputs, version, processed)
        limit = self.max_message_bytes
        too_big = [j for j, m in enumerate(built.messages) if message_size(m) > limit]
        if too_big:  # headers are validated before, so only with a very low limit: never produce them
            for j in too_big:
                self._bound("message_size", "the prediction of frame %s is %d bytes, above the %d of "
                            "MLPIPE_MAX_MESSAGE_BYTES: dead-lettered as %s", batch.frame_ids[j],
                            message_size(built.messages[j]), limit, R_UNDELIVERABLE)
            gone = {batch.frame_ids[j] for j in too_big}
            built.messages = [m for j, m in enumerate(built.messages) if j not in set(too_big)]
            built.captured = [c for j, c in enumerate(built.captured) if j not in set(too_big)]
            built.points = [pt for pt in built.points if pt.frame_id not in gone]
            keep = [j for j in range(len(batch.good)) if j not in set(too_big)]
            for j in too_big:
                batch.rejected.append((batch.good[j], FrameRejected(R_UNDELIVERABLE, "the prediction is larger "
                                                                    f"than the {limit} bytes a message may have")))
            batch.good = [batch.good[j] for j in keep]
            batch.frame_ids = [batch.frame_ids[j] for j in keep]
        messages = built.messages
        if batch.rejected:
            stored = self._store_originals(batch)
            messages.extend(dead_letter_records(batch.records, batch.rejected, dlq_topic=self.kafka.dlq_topic,
                                                processed_iso=iso(processed), max_message_bytes=limit,
                                                stored=stored))
            for i, rej in batch.rejected:
                rec = batch.records[i]
                logger.info("dead letter %s[%d]@%d: %s%s", rec.topic, rec.partition, rec.offset, rej,
                            f" (original stored at {stored[i]})" if i in stored else "")
        batch.messages, batch.points, batch.captured = messages, built.points, built.captured
        if messages:
            batch.ticket = self._producer.produce_batch(messages)
        self.stage_s["build_produce"] += time.perf_counter() - t1
        return True

    def _predictions(self, batch: _Batch, outputs: Mapping[str, Any], version: Any, processed: Any) -> Any:
        """The batch's predictions; ``version`` one per frame (a canary's split) builds each version's rows
        with their own version and puts them back in the frames' order."""
        policy = self.cfg.qdrant_policy if self.vectors is not None else None
        topic = self.kafka.predictions_topic
        if self.pipeline is not None:  # no rollout: one version per batch
            from tasks.serving.consumer.pipeline import pipeline_prediction_records

            one = version[0] if isinstance(version, list) and version else version
            return pipeline_prediction_records(batch.records, batch.good, batch.frame_ids, outputs, topic=topic,
                                               model=self.cfg.model, version=one if isinstance(one, str) else "",
                                               infer_s=batch.infer_s, processed=processed, policy=policy,
                                               classes=self.pipeline.classes)
        if not isinstance(version, list) or len(set(version)) <= 1:
            one = version[0] if isinstance(version, list) and version else version
            return prediction_records(batch.records, batch.good, batch.frame_ids, outputs, topic=topic,
                                      model=self.cfg.model, version=one if isinstance(one, str) else "",
                                      infer_s=batch.infer_s, processed=processed, policy=policy, spec=self.spec)
        parts = []
        for v in dict.fromkeys(version):
            rows = [j for j, x in enumerate(version) if x == v]
            part = prediction_records(batch.records, [batch.good[j] for j in rows],
                                      [batch.frame_ids[j] for j in rows],
                                      {k: val[rows] for k, val in outputs.items()}, topic=topic,
                                      model=self.cfg.model, version=v, infer_s=batch.infer_s, processed=processed,
                                      policy=policy, spec=self.spec)
            parts.append((rows, part))
        built = type(parts[0][1])()
        slots: list[Any] = [None] * len(version)
        for rows, part in parts:
            for j, m, c in zip(rows, part.messages, part.captured):
                slots[j] = (m, c)
            built.points.extend(part.points)
        built.messages = [m for m, _ in slots]
        built.captured = [c for _, c in slots]
        return built

    def _shadow_messages(self, ctx: Mapping[str, Any], outputs: Mapping[str, Any], version: str,
                         secs: float) -> list:
        """The shadow candidate's answers for the frames of ``ctx`` as ``predictions.shadow`` messages (frames
        either side could not use are left out; nothing is indexed)."""
        from tasks.contracts.messages import PREDICTIONS_SHADOW

        errs = outputs.get("FRAME_ERROR")
        rows = [j for j in range(len(ctx["good"]))] if errs is None else \
            [j for j, e in enumerate(errs.reshape(-1).tolist()) if not e]
        if not rows:
            return []
        part = prediction_records(ctx["records"], [ctx["good"][j] for j in rows], [ctx["frame_ids"][j] for j in rows],
                                  {k: v[rows] for k, v in outputs.items()}, topic=self.kafka.topic(PREDICTIONS_SHADOW),
                                  model=self.cfg.model, version=version, infer_s=secs, processed=utc_now(),
                                  policy=None, spec=self.spec)
        return part.messages

    # ----------------------------------------------------------------- oversize originals, refused messages
    def _original_store(self) -> OriginalStore:
        if self._store is None:
            from tasks.adapters.storage import open_store

            self._store = open_store()
        return self._store

    def _store_originals(self, batch: _Batch) -> dict[int, str]:
        """Store the originals that do not fit on their dead letter; record index -> object-store prefix."""
        stored: dict[int, str] = {}
        for i, _rej in batch.rejected:
            rec = batch.records[i]
            if dead_letter_plan(rec, self.max_message_bytes).needs_store:
                prefix = self._store_original(rec)
                if prefix is not None:
                    stored[i] = prefix
        return stored

    def _store_original(self, rec: "Record") -> str | None:
        """``value`` and ``record.json`` under ``dlq/<topic>/<partition>/<offset>/``; None when the store failed
        ``store_attempts`` times (a bound: the dead letter then says the original was not kept)."""
        from tasks.contracts.layout import dlq_original_prefix

        prefix = dlq_original_prefix(rec.topic, rec.partition, rec.offset)
        backoff = self._backoff()
        error: Exception | None = None
        for _ in range(max(1, self.cfg.store_attempts)):
            try:
                store = self._original_store()
                store.put_bytes(prefix + "value", rec.value or b"")
                store.put_bytes(prefix + "record.json", original_record_json(rec), "application/json")
                self.metrics.originals_stored.inc()
                return prefix
            except Exception as exc:  # noqa: BLE001 - any store failure: retried a bounded number of times
                error = exc
                self._stop.wait(backoff.next())
        self._bound("store_original", "the original of %s[%d]@%d (%d bytes) could not be stored after %d "
                    "attempt(s) (%s): its dead letter carries only what fits", rec.topic, rec.partition,
                    rec.offset, len(rec.value or b""), self.cfg.store_attempts, error)
        return None

    def _source_index(self, batch: _Batch, message: Message) -> int | None:
        """The index in ``batch.records`` of the frame a produced message is about."""
        topic, _value, key, headers = message
        if topic == self.kafka.predictions_topic and key is not None:
            fid = key.decode("utf-8", "replace")
            for j, f in enumerate(batch.frame_ids):
                if f == fid:
                    return batch.good[j]
            return None
        h = {k: v for k, v in headers}
        try:
            part, off = int(h["source_partition"]), int(h["source_offset"])
        except (KeyError, ValueError):
            return None
        for i, rec in enumerate(batch.records):
            if rec.partition == part and rec.offset == off:
                return i
        return None

    def _replace_refused(self, batch: _Batch, ticket: Any) -> list[Message]:
        """Messages the broker refused for good -> their replacements: a prediction becomes a dead letter
        (``undeliverable``), a dead letter a minimal one; after two rounds the message is dropped (a bound)."""
        refused = list(getattr(ticket, "rejected", None) or [])
        if not refused:
            return []
        ticket.rejected = []
        batch.fallback += 1
        out: list[Message] = []
        processed_iso = iso(utc_now())
        for message, error in refused:
            i = self._source_index(batch, message)
            what = "prediction" if message[0] == self.kafka.predictions_topic else "dead letter"
            if i is None or batch.fallback > 2:
                self._bound("undeliverable", "the broker refused the %s %s for good (%s) after %d replacement(s): "
                            "dropped", what, message[2], error, batch.fallback - 1)
                self.stats["dropped"] += 1
                continue
            self._bound("message_refused", "the broker refused the %s of %s[%d]@%d for good (%s): sending a %s "
                        "dead letter instead", what, batch.records[i].topic, batch.records[i].partition,
                        batch.records[i].offset, error, "minimal" if what == "dead letter" else "")
            if what == "prediction":
                fid = message[2].decode("utf-8", "replace") if message[2] else ""
                batch.points = [pt for pt in batch.points if pt.frame_id != fid]
                rej = FrameRejected(R_UNDELIVERABLE, f"the broker refused the prediction: {error}")
            else:
                rej = next((r for j, r in batch.rejected if j == i), FrameRejected(R_UNDELIVERABLE, str(error)))
            out.extend(dead_letter_records(batch.records, [(i, rej)], dlq_topic=self.kafka.dlq_topic,
                                           processed_iso=processed_iso, max_message_bytes=self.max_message_bytes,
                                           minimal=what == "dead letter" or batch.fallback > 1))
        return out

    def _set_acks_failing(self, failing: bool) -> None:
        if failing != self._acks_failing:
            self._acks_failing = failing
            self.metrics.acks_failing.set(1 if failing else 0)

    def _confirm(self, batch: _Batch) -> bool:
        """Wait for the batch's Kafka acks (re-sending failures), upsert to Qdrant, commit. False: not committed."""
        assert self._consumer is not None and self._producer is not None
        producer = self._producer

        def give_up() -> bool:  # a stop request or a lost log must not wait out a broker outage
            return (self._stop.is_set() and self._draining_too_long()) or self._reset_reason is not None

        def confirm_kafka() -> None:
            from tasks.adapters.kafka import DeliveryError

            assert batch.ticket is not None
            ticket = batch.ticket
            try:
                producer.wait(ticket, timeout=10.0, give_up=give_up)
            except DeliveryError:
                self._set_acks_failing(True)
                if ticket.pending == 0 and (ticket.failed or getattr(ticket, "rejected", None)):
                    # re-send just the failures (and the replacements of what was refused for good)
                    batch.ticket = producer.produce_batch(list(ticket.failed) + self._replace_refused(batch, ticket))
                raise
            self._set_acks_failing(False)
            again = self._replace_refused(batch, ticket)
            if again:
                batch.ticket = producer.produce_batch(again)
                confirm_kafka()

        t0 = time.perf_counter()
        if batch.ticket is not None and not self._retry(
                f"writing {len(batch.messages)} message(s) to Kafka", "kafka", confirm_kafka):
            return False
        t1 = time.perf_counter()
        self.stage_s["wait_kafka_acks"] += t1 - t0
        points = batch.points
        if points:
            vectors = self.vectors
            assert vectors is not None
            if not self._retry(f"upserting {len(points)} point(s) to Qdrant", "qdrant", bounded=True, fn=
                               lambda: vectors.upsert_predictions(points)):
                return False
            self.metrics.qdrant_points.inc(len(points))
            self.stats["qdrant_points"] += len(points)
        written = time.time()  # both sinks hold the batch's predictions
        t2 = time.perf_counter()
        self.stage_s["qdrant"] += t2 - t1
        observe = self.metrics.e2e_latency.observe
        record = self.latencies.append if self.cfg.record_latency else None
        for cap in batch.captured:
            if cap is not None:
                t_cap = cap.timestamp()
                observe(max(0.0, written - t_cap))
                if record is not None:
                    record((t_cap, written - t_cap, batch.polled_wall - t_cap, batch.answered_wall - t_cap,
                            batch.processed_wall - t_cap))

        self.offsets.confirm(batch.seq)
        if not self._commit_confirmed():
            return False
        self.stage_s["commit"] += time.perf_counter() - t2
        t_done = time.monotonic()
        if self._first_batch_at is None:
            self._first_batch_at = batch.polled_at
        self.stats["busy_s"] = round(t_done - self._first_batch_at, 3)
        self.stats["batches"] += 1
        if batch.good:
            self.metrics.frames.labels("predicted").inc(len(batch.good))
            self.stats["predicted"] += len(batch.good)
        if batch.rejected:
            self.metrics.frames.labels("dead_letter").inc(len(batch.rejected))
            self.stats["dead_letter"] += len(batch.rejected)
            for _, rej in batch.rejected:
                self.metrics.dead_letters.labels(rej.reason).inc()
        batch.trace.finish(version=batch.version, predicted=len(batch.good), dead_letters=len(batch.rejected),
                           produced_at=batch.processed_wall, kafka_s=t1 - t0, qdrant_s=t2 - t1,
                           points=len(points), written_at=written)
        return True

    def _commit_confirmed(self, force: bool = False) -> bool:
        """Commit the offsets of confirmed batches: at most every ``commit_interval_ms``, or now (``force``:
        the loop has nothing else in hand, Triton is down, partitions are revoked). False: giving up at stop.

        Asynchronous: the loop does not wait for the coordinator; a lost commit only means redelivery
        (idempotent sinks). The last offsets are committed synchronously at shutdown. Fewer commits
        spare the broker: on the local Tansu broker one per batch cost ~0.05 cores at 3.8k frames/s.
        """
        offsets = self.offsets.due()
        if not offsets:
            return True
        t = time.monotonic()
        if not force and (t - self._last_commit) * 1000.0 < self.cfg.commit_interval_ms:
            return True
        assert self._consumer is not None
        consumer = self._consumer
        if not self._commit_allowed():  # kept due: committed once the broker's log is verified as the same
            self.metrics.commits_withheld.inc()
            return True

        def commit() -> None:
            res = consumer.commit(offsets, asynchronous=True)
            if not res.ok:
                if not res.retriable:
                    logger.info("commit skipped (%s): partitions moved to another member, which re-reads them",
                                res.error)
                    return
                raise RuntimeError(res.error)

        if not self._retry("committing offsets", "commit", commit):
            return False
        self._last_commit = t
        self.offsets.committed(offsets)
        self.metrics.commits.inc()
        self.stats["commits"] += 1
        return True

    def _revoked(self, partitions: list[tuple[str, int]]) -> None:
        """Before partitions move to another member (cooperative-sticky: only those that change owner; eager or a
        lost session: all): commit what was confirmed for them, synchronously, and forget them.

        The batches in hand keep their frames of those partitions: they are still written (the sinks are
        idempotent: a Qdrant point per frame id, predictions keyed by frame id), but their offsets are dropped
        (``OffsetTracker.revoke``), so this member never commits past what it confirmed before the revoke; the
        new owner starts from the commit made here and re-reads the rest (at-least-once, nothing lost)."""
        assert self._consumer is not None
        offsets = self.offsets.revoke(partitions)
        for tp in partitions:
            self._next_pos.pop(tp, None)  # a partition that comes back starts from the group's offset
        if offsets and not self._commit_allowed():
            self.metrics.commits_withheld.inc()
            logger.warning("not committing on revoke: the broker's log is not verified as the one these offsets "
                           "belong to (%s)", self._broker_state)
            return
        if offsets:
            res = self._consumer.commit(offsets)
            if res.ok:
                self.metrics.commits.inc()
                self.stats["commits"] += 1
            else:
                logger.warning("commit on revoke failed (%s): the new owner re-reads those frames", res.error)

    def _update_lag(self, every_s: float = 1.0) -> None:
        """Copy the consumer's lag (librdkafka statistics) into the gauges, at most every ``every_s``.

        Called from the loop and while it waits (a Triton outage, a sink retry): the held frames are
        exactly the lag an operator looks for then."""
        assert self._consumer is not None
        t = time.monotonic()
        if t - self._last_lag < every_s:
            return
        self._last_lag = t
        lag = self._consumer.lag()
        total = 0
        for (topic, part), value in lag.items():
            self.metrics.lag.labels(topic, str(part)).set(value)
            total += value
        self.metrics.lag_total.set(total)

    # ----------------------------------------------------------------- main loop
    def run(self) -> dict[str, int]:
        if self.cfg.http_port is not None and self.http is None:
            self.http = HealthServer(self.cfg.http_host, self.cfg.http_port, self.metrics, self.live,
                                     self.ready).start()
        health = threading.Thread(target=self._health_loop, name="triton-health", daemon=True)
        if self.backend is not None:
            self._triton_ready = self.backend.ready()
        health.start()
        try:
            if self.cfg.create_topics and not self._ensure_topics():
                return self.stats
            self._open()
            if self._watch is not None:
                threading.Thread(target=self._broker_loop, name="broker-watch", daemon=True).start()
            assert self._consumer is not None
            self._infer_pool = ThreadPoolExecutor(max_workers=max(1, self.cfg.inflight), thread_name_prefix="infer")
            tune_gc()
            logger.info("consuming %s as group %s (batch <= %d, wait <= %d ms), Triton %s %s %s, Qdrant %s",
                        self.kafka.frames_topic, self.cfg.group_id, self.cfg.max_batch, self.cfg.max_wait_ms,
                        self.cfg.triton_url, "pipeline" if self.pipeline is not None else "model", self.cfg.model,
                        self.cfg.qdrant_policy.text if self.vectors is not None else "off")
            self._loop()
        finally:
            self._shutdown()
            self.stats["stage_s"] = {k: round(v, 3) for k, v in self.stage_s.items()}
        return self.stats

    def _loop(self) -> None:
        """Three batches in hand: k+1 decoded and sent to Triton, k written, k-1 confirmed and committed.

        k-1's confirmation (Kafka acks, Qdrant upsert) overlaps Triton's work on k and k+1 (with
        ``--inflight`` 2 the next batch waits in Triton's queue while one is answered). Commits stay in
        offset order (batches are confirmed one after the other) and nothing after a batch that could
        not be finished is ever committed.
        """
        while not self._stop.is_set():
            try:
                self._loop_once_per_incarnation()
                return
            except BrokerReset as exc:  # the batches in hand belong to the lost log: dropped with it
                self._reset_broker(str(exc), self.offsets.held)

    def _check_positions(self, records: list["Record"]) -> None:
        """Offsets that go back while the partition stays assigned (and was not rewound): the log was replaced."""
        pos = self._next_pos
        for r in records:
            tp = (r.topic, r.partition)
            expected = pos.get(tp)
            if expected is not None and r.offset < expected and self._reset_reason is None:
                self._reset_reason = (f"offsets went back on {r.topic}[{r.partition}]: got {r.offset}, expected "
                                      f"{expected} or later")
            pos[tp] = r.offset + 1

    def _loop_once_per_incarnation(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        to_confirm: _Batch | None = None  # produced, waiting for acks / Qdrant / commit
        pending: _Batch | None = None  # sent to Triton
        wait_s = self.cfg.max_wait_ms / 1000.0
        while not self._stop.is_set():
            self._heartbeat = time.monotonic()
            self._raise_if_reset()
            busy = pending is not None or to_confirm is not None
            t0 = time.perf_counter()
            # With batches in hand, take only what has arrived (consume() waits its whole timeout unless
            # max_batch frames come): waiting here would delay the batches in hand. Measured at half load:
            # p95 to both sinks 51 ms with a 2 ms wait, 37 ms without.
            records = consumer.poll_batch(self.cfg.max_batch, 0 if busy else wait_s)
            t1 = time.perf_counter()
            self.stage_s["poll"] += t1 - t0
            batch = None
            if records:
                self._check_positions(records)
                self._raise_if_reset()
                self._last_message = time.monotonic()
                batch = self._prepare(records)
                self._submit(batch)
                self.stage_s["check"] += time.perf_counter() - t1  # cheap frame checks + submit
            if to_confirm is not None:
                if not self._confirm(to_confirm):
                    return  # only when stopping: nothing after an unfinished batch may be committed
                to_confirm = None
            if pending is not None:
                if not self._write(pending):
                    return
                to_confirm = pending
            elif not self._commit_confirmed(force=True):  # nothing in hand but what was confirmed
                return
            pending = batch
            self._update_lag()
            now = time.monotonic()
            if (self.cfg.exit_when_idle_s is not None and pending is None and to_confirm is None
                    and consumer.assigned_once and now - self._last_message > self.cfg.exit_when_idle_s):
                logger.info("no frames for %.1fs: exiting (--exit-when-idle)", self.cfg.exit_when_idle_s)
                break
        if to_confirm is not None and not self._confirm(to_confirm):
            return
        if pending is not None and self._write(pending):
            self._confirm(pending)

    def _shutdown(self) -> None:
        # After a stop request everything here must fit in ~1.5 s past the drain budget: with the broker
        # unreachable, a synchronous commit blocks for 30 s and more (librdkafka's request timeouts), and
        # leaving the group waits on the same broker, so both run in a thread the process stops waiting
        # for (``abandoned``).
        exit_by = (self._stop_deadline if self._stop_deadline is not None
                   else time.monotonic() + self.cfg.drain_timeout_s) + 1.5
        consumer, committed = self._consumer, self.offsets.final()

        def leave() -> None:
            if consumer is None:
                return
            if committed and self._watch is not None:
                # verify right now that these offsets belong to this log: a broker that lost its log since
                # would otherwise get them, and the next consumer of the group would skip frames below them
                self._check_broker(timeout=1.0)
                if not self._commit_allowed():
                    self._bound("final_commit", "the broker's log is not verified as the one the offsets were "
                                "confirmed in (%s%s): final commit skipped, the next consumer re-reads from the "
                                "last commit", self._broker_state,
                                f": {self._reset_reason}" if self._reset_reason else "")
                    consumer.close()
                    return
            if committed:
                res = consumer.commit(committed)  # synchronous: the last async commits may be in flight
                if not res.ok:
                    logger.warning("final commit failed (%s): the last frames will be redelivered", res.error)
            consumer.close()  # leaves the group at once: partitions move without waiting for the timeout

        leaving = threading.Thread(target=leave, name="leave-group", daemon=True)
        leaving.start()
        leaving.join(max(0.5, exit_by - 0.5 - time.monotonic()))
        if leaving.is_alive():
            self.abandoned = True
            self._bound("shutdown", "the broker did not answer the final commit / leaving the group in time: "
                        "exiting without them; frames after the last acknowledged commit will be redelivered")
        if self.rollout is not None:
            self.rollout.close()  # its evidence flushed; shadow calls still waiting are dropped (best effort)
        if self._producer is not None:
            self._producer.close(timeout=max(0.1, min(2.0, exit_by - time.monotonic())))
        if self._infer_pool is not None:
            self._infer_pool.shutdown(wait=False, cancel_futures=True)
        self._stop.set()
        if self.http is not None:
            self.http.stop()
        logger.info("consumer stopped: %s", json.dumps(self.stats))
