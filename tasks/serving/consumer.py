"""The streaming consumer (Triton sidecar): frames in, predictions out.

``mlpipe stream --help``. One member of the consumer group on
``frames``:

1. poll a micro-batch (``--max-batch`` messages or ``--max-wait-ms``);
2. validate and decode it (PNG or raw 784 bytes -> uint8 ``[N, 28, 28]``);
   poison frames (no/invalid ``frame_id`` header, oversize, undecodable,
   wrong shape) go to ``frames.dlq`` with the original key, bytes and headers
   plus a ``reason`` header;
3. one Triton call per micro-batch (split into chunks of the model's
   ``max_batch_size``, sent concurrently) to the ensemble ``<model>``;
4. produce one JSON prediction per frame to ``predictions`` (key = frame id)
   and wait for the broker's acknowledgement of every message of the batch
   (failed ones are produced again);
5. upsert the selected predictions into Qdrant (point id = frame id);
6. commit the batch's offsets, only after 4 and 5 succeeded (asynchronously,
   in batch order, at most every ``--commit-interval-ms`` and whenever the loop
   has nothing else in hand, before fetching pauses for a Triton outage and when
   partitions are revoked; the last offsets again synchronously at shutdown).

Prediction value (JSON): ``frame_id``, ``device_id`` (the frame's key), ``label``,
``score``, ``topk`` (``[{"label", "score"}]`` x3), ``model_name`` (the ensemble),
``model_version`` (the ``<model>_classifier`` version Triton reports READY,
looked up every 2 s; the ensemble serves the one loaded version),
``latency_ms`` (captured_at -> processed_at), ``inference_ms`` (the Triton call
of the micro-batch), ``processed_at``, ``captured_at``, ``traceparent``. The
Qdrant payload is the same without ``traceparent``, plus ``indexed_because``.

At-least-once with idempotent sinks: a crash between 4 and 6 redelivers the
batch; Qdrant keeps one point per frame id, ``predictions`` may carry a
duplicate (consumers of it key by frame id).

Micro-batches are pipelined: while batch k+1 is decoded and sent to Triton,
batch k's predictions are produced and batch k-1's acknowledgements are
awaited and its offsets committed. ``--inflight`` (2) micro-batches go to
Triton at once, so the next one waits in Triton's queue while one is answered.
With batches in hand the loop takes only the frames already fetched (no wait).
Batches are confirmed strictly in order, and nothing after a batch that could
not be finished is committed. ``--stats-json`` gets the main thread's seconds
per step (``stage_s``); ``--latency-log`` each frame's time to both sinks and
to each step before (polled, Triton answered, answer taken by the loop).

Faults: Triton down or slow -> the partitions are paused (``poll`` keeps being
called, so the member stays in the group and rebalances are served; partitions
assigned meanwhile are paused too), the batch is retried with exponential
backoff and nothing is committed past it; fetching resumes when Triton answers.
A call counts as failed after ``--triton-timeout`` seconds (a hung or overloaded
Triton is treated like a down one). While paused the lag gauges keep being
updated, so the held frames show as consumer lag.
Broker down -> librdkafka reconnects, writes and commits are retried with
backoff; the process never exits for it. SIGTERM/SIGINT -> stop fetching,
finish the batches in hand (bounded by ``--drain-timeout``, 7 s, also while
Triton or the broker hangs: no wait outlasts it), commit, leave the group, exit 0
within 10 s. With the broker unreachable the final commit and leaving the group
get ~1.5 s and are then abandoned (the uncommitted frames are redelivered).

Qdrant policy (``--qdrant-policy``, comma-separated union of rules):
``all`` | ``none`` | ``sample:<fraction>`` (deterministic on the frame id, so a
redelivered frame makes the same choice) | ``low_confidence:<threshold>``
(score below it). Default ``low_confidence:0.7,sample:0.05``: the vector
store holds every frame worth a human look (active-learning / labelling
queue) plus an unbiased 5 % sample for drift monitoring of embeddings, while
every prediction still goes to Kafka. Indexing all frames would make Qdrant
the bottleneck (local mode persists ~1k points/s; a server is faster but it
is still a synchronous write per batch) for little analytical value. The
threshold is 0.7 because the trainer uses label smoothing (0.1), which caps
confident scores near 0.9: on the golden set a score below 0.7 flags ~8 % of
frames and 14 of the 16 errors; 0.9 would flag a quarter of all frames.

Operations (``--http-host``/``--http-port``, loopback by default):
``/metrics`` (Prometheus), ``/healthz`` (the main loop is alive),
``/readyz`` (partitions assigned by the group and Triton ready).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import hashlib
import io
import json
import logging
import os
import signal
import struct
import sys
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FuturesTimeout
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, Callable, Sequence

from tasks.contracts.messages import (DEFAULT_MAX_FRAME_BYTES, IMAGE_SIZE, R_INVALID_ID, R_MISSING_ID, RAW_BYTES,
                                      FrameRejected)
from tasks.contracts.serving import MAX_BATCH
from tasks.model.frames import decode_pixels

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from tasks.adapters.kafka import BatchConsumer, BusProducer, KafkaConfig, Record
    from tasks.adapters.qdrant import VectorStore

logger = logging.getLogger(__name__)

DEFAULT_QDRANT_POLICY = "low_confidence:0.7,sample:0.05"
DEFAULT_GROUP = "mlpipe-consumer"


# --------------------------------------------------------------------------- qdrant policy


@dataclass(frozen=True)
class QdrantPolicy:
    """Which predictions are indexed in Qdrant. ``parse("low_confidence:0.7,sample:0.05")``."""

    index_all: bool = False
    sample: float = 0.0
    low_confidence: float | None = None
    text: str = "none"

    @classmethod
    def parse(cls, text: str) -> "QdrantPolicy":
        index_all, sample, low = False, 0.0, None
        for part in [p.strip() for p in (text or "").split(",") if p.strip()]:
            name, _, arg = part.partition(":")
            name = name.strip().lower()
            try:
                if name == "all" and not arg:
                    index_all = True
                elif name == "none" and not arg:
                    pass
                elif name == "sample":
                    sample = float(arg)
                    if not 0.0 <= sample <= 1.0:
                        raise ValueError
                elif name in {"low_confidence", "low-confidence"}:
                    low = float(arg)
                    if not 0.0 <= low <= 1.0:
                        raise ValueError
                else:
                    raise ValueError
            except ValueError:
                raise ValueError(f"bad Qdrant policy part {part!r}: use all | none | sample:<0..1> | "
                                 "low_confidence:<0..1>, comma-separated") from None
        return cls(index_all=index_all, sample=sample, low_confidence=low, text=text or "none")

    @property
    def enabled(self) -> bool:
        return self.index_all or self.sample > 0 or self.low_confidence is not None

    def reason(self, frame_id: str, score: float) -> str | None:
        """Why this prediction is indexed ("all", "low_confidence", "sample"), or None."""
        if self.index_all:
            return "all"
        if self.low_confidence is not None and score < self.low_confidence:
            return "low_confidence"
        if self.sample > 0:
            h = int.from_bytes(hashlib.blake2b(frame_id.encode(), digest_size=8).digest(), "big")
            if h / 2.0 ** 64 < self.sample:
                return "sample"
        return None


# --------------------------------------------------------------------------- metrics + health


class Metrics:
    """Prometheus metrics of one consumer (own registry, so several can live in one process)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.frames = Counter("mlpipe_consumer_frames_total", "Frames handled, by outcome", ["outcome"],
                              registry=r)
        self.dead_letters = Counter("mlpipe_consumer_dead_letters_total", "Frames sent to the DLQ, by reason",
                                    ["reason"], registry=r)
        self.batch_size = Histogram("mlpipe_consumer_batch_size", "Frames per micro-batch",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024), registry=r)
        self.e2e_latency = Histogram(
            "mlpipe_consumer_e2e_latency_seconds",
            "captured_at header -> both sinks written (prediction acknowledged by Kafka, Qdrant upserted)",
            buckets=(0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60), registry=r)
        self.triton_latency = Histogram("mlpipe_consumer_triton_seconds", "Triton call time per micro-batch",
                                        buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5),
                                        registry=r)
        self.lag = Gauge("mlpipe_consumer_lag_messages", "Consumer lag (high watermark - committed offset)",
                         ["topic", "partition"], registry=r)
        self.lag_total = Gauge("mlpipe_consumer_lag_total_messages", "Consumer lag summed over the assignment",
                               registry=r)
        self.triton_errors = Counter("mlpipe_consumer_triton_errors_total", "Failed Triton calls", registry=r)
        self.write_errors = Counter("mlpipe_consumer_write_errors_total", "Failed sink writes or commits",
                                    ["sink"], registry=r)
        self.qdrant_points = Counter("mlpipe_consumer_qdrant_points_total", "Points upserted to Qdrant",
                                     registry=r)
        self.paused = Gauge("mlpipe_consumer_paused", "1 while fetching is paused (Triton unavailable)",
                            registry=r)
        self.commits = Counter("mlpipe_consumer_commits_total", "Offset commits", registry=r)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class HealthServer:
    """``/metrics``, ``/healthz``, ``/readyz`` on a small threaded HTTP server."""

    def __init__(self, host: str, port: int, metrics: Metrics, live: Callable[[], tuple[bool, dict]],
                 ready: Callable[[], tuple[bool, dict]]) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server API
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    from prometheus_client import CONTENT_TYPE_LATEST

                    self._send(200, outer.metrics.render(), CONTENT_TYPE_LATEST)
                elif path in {"/healthz", "/readyz"}:
                    ok, detail = (outer.live if path == "/healthz" else outer.ready)()
                    body = json.dumps({"status": "ok" if ok else "unavailable", **detail}).encode()
                    self._send(200 if ok else 503, body, "application/json")
                else:
                    self._send(404, b'{"detail": "not found: use /metrics, /healthz or /readyz"}',
                               "application/json")

            def _send(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt: str, *args: Any) -> None:
                logger.debug("http: " + fmt, *args)

        self.metrics, self.live, self.ready = metrics, live, ready
        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.host = host
        self._thread = threading.Thread(target=self.server.serve_forever, name="health-http", daemon=True)

    def start(self) -> "HealthServer":
        self._thread.start()
        logger.info("metrics and health on http://%s:%d (/metrics /healthz /readyz)", self.host, self.port)
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# --------------------------------------------------------------------------- Triton


class InferenceUnavailable(RuntimeError):
    """Triton could not answer (down, slow, model not loaded): retry later, never drop."""


class TritonBackend:
    """The consumer's view of Triton: batched inference, readiness, the served classifier version.

    All calls go through ``tasks.adapters.triton.TritonClient`` (the one module that talks
    to Triton). A micro-batch larger than the model's ``max_batch_size`` is
    split into chunks that are sent concurrently.
    """

    def __init__(self, url: str, model: str, timeout_s: float = 10.0, max_model_batch: int = MAX_BATCH,
                 concurrency: int = 4) -> None:
        from tasks.adapters.triton import TritonClient

        self.url = url
        self.model = model
        self.timeout_s = timeout_s
        self.chunk = max(1, int(max_model_batch))
        self._client = TritonClient(url, protocol="grpc", timeout=timeout_s, max_batch_size=self.chunk)
        self._health_client = TritonClient(url, protocol="grpc", timeout=min(timeout_s, 2.0))
        self._pool = ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="triton")
        self._version = ""
        self._version_checked = -1e9

    def _infer_one(self, images: "np.ndarray") -> dict[str, "np.ndarray"]:
        return self._client.infer_images(self.model, images)

    def infer(self, images: "np.ndarray") -> dict[str, "np.ndarray"]:
        """Outputs for uint8 ``[N, 28, 28]``; ``InferenceUnavailable`` on any failure."""
        import numpy as np

        n = len(images)
        try:
            if n <= self.chunk:
                return self._infer_one(images)
            futures = [self._pool.submit(self._infer_one, images[i:i + self.chunk]) for i in range(0, n, self.chunk)]
            parts = [f.result() for f in futures]
        except Exception as exc:  # noqa: BLE001 - TritonError, or gRPC errors of several types
            # A fresh channel on the next call: gRPC's own reconnect backoff grows to minutes and
            # would delay the recovery long after Triton is back.
            self._client.close()
            raise InferenceUnavailable(str(exc)) from exc
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def ready(self) -> bool:
        ok = self._health_client.is_ready()
        if not ok:
            self._health_client.close()  # see infer(): reconnect at once next time
        return ok

    @property
    def version(self) -> str:
        """The last known served classifier version (no call)."""
        return self._version

    def model_version(self, max_age_s: float = 10.0) -> str:
        """The served classifier version ("" when unknown), refreshed at most every ``max_age_s``."""
        from tasks.model.repo import classifier_name

        now = time.monotonic()
        if now - self._version_checked >= max_age_s:
            self._version_checked = now
            try:
                versions = self._health_client.ready_versions(classifier_name(self.model))
                self._version = str(max(versions)) if versions else ""
            except Exception as exc:  # noqa: BLE001 - unknown version is not worth failing a batch
                logger.debug("classifier version lookup failed: %s", exc)
        return self._version

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        for client in (self._client, self._health_client):
            close = getattr(client, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:  # noqa: BLE001
                    pass


# --------------------------------------------------------------------------- the consumer


@dataclass
class StreamConfig:
    group_id: str = DEFAULT_GROUP
    model: str = "digits"
    triton_url: str = "127.0.0.1:8001"
    max_batch: int = 256
    max_wait_ms: int = 5
    max_model_batch: int = MAX_BATCH
    inflight: int = 2  # micro-batches at Triton at once: the next one is queued there while one is answered
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    qdrant_policy: QdrantPolicy = field(default_factory=lambda: QdrantPolicy.parse(DEFAULT_QDRANT_POLICY))
    http_host: str = "127.0.0.1"
    http_port: int | None = 9108  # None: no HTTP server
    session_timeout_ms: int = 10000
    triton_timeout_s: float = 10.0
    backoff_initial_s: float = 0.2
    backoff_max_s: float = 5.0
    drain_timeout_s: float = 7.0
    exit_when_idle_s: float | None = None
    create_topics: bool = True
    kafka_overrides: dict[str, Any] = field(default_factory=dict)
    commit_interval_ms: int = 100  # confirmed offsets are committed at most this often (and when idle)
    record_latency: bool = False  # keep per frame captured_at and the seconds to each step (--latency-log)


@dataclass
class _Batch:
    records: list["Record"]
    good: list[int]  # indexes into records
    images: "np.ndarray | None"
    rejected: list[tuple[int, FrameRejected]]
    frame_ids: list[str]
    polled_at: float
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

    def offsets(self) -> dict[tuple[str, int], int]:
        out: dict[tuple[str, int], int] = {}
        for r in self.records:
            key = (r.topic, r.partition)
            if r.offset + 1 > out.get(key, -1):
                out[key] = r.offset + 1
        return out


_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True)


def _parse_time(value: str | None) -> dt.datetime | None:
    if not value:
        return None
    try:
        t = dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _iso(t: dt.datetime) -> str:
    return t.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class StreamConsumer:
    """The consumer loop. ``run()`` returns when stopped (``stop()``, SIGTERM) or idle long enough."""

    def __init__(self, kafka: "KafkaConfig", cfg: StreamConfig, backend: TritonBackend | None = None,
                 vectors: "VectorStore | None" = None) -> None:
        self.kafka = kafka
        self.cfg = cfg
        self.metrics = Metrics()
        self.backend = backend
        self.vectors = vectors
        self._stop = threading.Event()
        self._stop_deadline: float | None = None
        self._heartbeat = time.monotonic()
        self._triton_ready = False
        self._consumer: BatchConsumer | None = None
        self._producer: BusProducer | None = None
        self._infer_pool: ThreadPoolExecutor | None = None
        self._rewind: dict[tuple[str, int], int] = {}
        self._last_message = time.monotonic()
        self.stats = {"predicted": 0, "dead_letter": 0, "batches": 0, "commits": 0, "triton_errors": 0,
                      "qdrant_points": 0, "rewinds": 0, "busy_s": 0.0}
        self.http: HealthServer | None = None
        self._first_batch_at: float | None = None
        self._last_infer_ok = 0.0
        self._committed: dict[tuple[str, int], int] = {}  # confirmed offsets, committed at shutdown again
        self._to_commit: dict[tuple[str, int], int] = {}  # confirmed, not committed yet
        self._last_commit = 0.0
        self._last_lag = -1e9  # when the lag gauges were last updated
        self.abandoned = False  # shutdown gave up on the broker: the process must not wait for librdkafka
        # per frame, if recorded: captured_at (epoch), then seconds from it until: both sinks written, the
        # loop polled the frame, Triton answered, the loop took the answer
        self.latencies: list[tuple[float, float, float, float, float]] = []
        # main-thread seconds per step of the loop (in --stats-json: where the time goes)
        self.stage_s = dict.fromkeys(("poll", "decode", "wait_triton", "build_produce", "wait_kafka_acks",
                                      "qdrant", "commit"), 0.0)

    # ----------------------------------------------------------------- health
    def live(self) -> tuple[bool, dict]:
        age = time.monotonic() - self._heartbeat
        return age < 60.0, {"loop_age_s": round(age, 3)}

    def ready(self) -> tuple[bool, dict]:
        c = self._consumer
        assigned = bool(c is not None and c.in_group)
        detail = {"assigned": assigned, "partitions": len(c.assignment) if c else 0,
                  "triton_ready": self._triton_ready, "paused": bool(c and c.paused)}
        return assigned and self._triton_ready and not self._stop.is_set(), detail

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

    # ----------------------------------------------------------------- setup
    def _ensure_topics(self) -> bool:
        from tasks.adapters.kafka import BusError, ensure_topics

        backoff = self.cfg.backoff_initial_s
        while not self._stop.is_set():
            self._heartbeat = time.monotonic()
            try:
                ensure_topics(self.kafka, timeout=3.0)
                return True
            except BusError as exc:
                msg = str(exc)
                if "AUTHORIZATION" in msg.upper() or "not authorized" in msg.lower():
                    logger.warning("cannot create topics (%s); assuming they are managed elsewhere", msg)
                    return True
                logger.warning("broker not reachable yet (%s); retrying in %.1fs", msg, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.cfg.backoff_max_s)
        return False

    def _open(self) -> None:
        from tasks.adapters.kafka import BatchConsumer, BusProducer

        overrides = {"session.timeout.ms": self.cfg.session_timeout_ms,
                     "heartbeat.interval.ms": max(100, self.cfg.session_timeout_ms // 5),
                     "fetch.wait.max.ms": max(5, min(100, self.cfg.max_wait_ms)),
                     **self.cfg.kafka_overrides}
        def assigned(_partitions: list[tuple[str, int]]) -> None:
            self._last_message = time.monotonic()  # idle time counts from the (re)assignment

        self._consumer = BatchConsumer(self.kafka, self.cfg.group_id, [self.kafka.frames_topic],
                                       on_assign=assigned, on_revoke=self._revoked, stats_interval_ms=2000,
                                       **overrides)
        self._producer = BusProducer(self.kafka)

    # ----------------------------------------------------------------- batch preparation
    def _prepare(self, records: list["Record"]) -> _Batch:
        import numpy as np

        from tasks.contracts.messages import H_CONTENT_TYPE, H_FRAME_ID

        polled_wall = time.time()  # before decoding: the latency log's "polled" step ends here
        good: list[int] = []
        rejected: list[tuple[int, FrameRejected]] = []
        frame_ids: list[str] = []
        buf = bytearray(len(records) * RAW_BYTES)
        n = 0
        for i, rec in enumerate(records):
            try:
                raw_id = rec.headers.get(H_FRAME_ID)
                if raw_id is None:
                    raise FrameRejected(R_MISSING_ID, "the frame has no frame_id header")
                try:
                    fid = str(uuid.UUID(raw_id.decode("ascii").strip()))
                except (ValueError, UnicodeDecodeError):
                    raise FrameRejected(R_INVALID_ID, f"frame_id header {raw_id[:64]!r} is not a UUID") from None
                ctype = rec.header(H_CONTENT_TYPE)
                pixels = decode_pixels(rec.value, ctype, self.cfg.max_frame_bytes)
            except FrameRejected as exc:
                rejected.append((i, exc))
                continue
            buf[n * RAW_BYTES:(n + 1) * RAW_BYTES] = pixels
            n += 1
            good.append(i)
            frame_ids.append(fid)
        images = np.frombuffer(bytes(buf[:n * RAW_BYTES]), dtype=np.uint8).reshape(n, IMAGE_SIZE, IMAGE_SIZE) \
            if n else None
        return _Batch(records=records, good=good, images=images, rejected=rejected, frame_ids=frame_ids,
                      polled_at=time.monotonic(), polled_wall=polled_wall)

    def _submit(self, batch: _Batch) -> None:
        if batch.images is not None and self.backend is not None:
            assert self._infer_pool is not None
            batch.submitted_at = time.monotonic()
            batch.future = self._infer_pool.submit(self._timed_infer, batch.images)

    def _await(self, future: Future | None) -> Any:
        """``future.result()``; raises ``FuturesTimeout`` once a stop request's drain budget is spent (a hung
        Triton holds a call for up to ``--triton-timeout``: SIGTERM must not wait for it)."""
        assert future is not None, "a batch with images needs a Triton backend"
        while True:
            try:
                return future.result(timeout=0.25)
            except FuturesTimeout:
                if self._stop.is_set() and self._draining_too_long():
                    raise

    def _timed_infer(self, images: "np.ndarray") -> tuple[dict, float, float]:
        """Triton's outputs, the seconds the call took and when it returned (epoch)."""
        assert self.backend is not None
        t0 = time.perf_counter()
        out = self.backend.infer(images)
        return out, time.perf_counter() - t0, time.time()

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
            for rec in extra:  # fetched before the pause took effect: re-read them later
                key = (rec.topic, rec.partition)
                if rec.offset < self._rewind.get(key, 1 << 62):
                    self._rewind[key] = rec.offset
            self._update_lag()
            if self._stop.is_set() and self._draining_too_long():
                return

    def _resume(self) -> None:
        assert self._consumer is not None
        if self._rewind:
            self._consumer.rewind(self._rewind)
            self.stats["rewinds"] += len(self._rewind)
            self._rewind = {}
        if self._consumer.paused:
            self._consumer.resume()
            self.metrics.paused.set(0)

    # ----------------------------------------------------------------- finishing a batch
    def _results(self, batch: _Batch) -> dict | None:
        """Triton outputs for the batch, retrying (paused) until Triton answers; None when giving up."""
        assert self._consumer is not None
        if batch.images is None:
            return {}
        backoff = self.cfg.backoff_initial_s
        attempt = 0
        while True:
            try:
                if batch.future is None:  # a retry: through the pool too, so a stop request need not wait out
                    self._submit(batch)   # Triton's timeout
                out, secs, batch.answered_wall = self._await(batch.future)
                batch.future = None
                batch.infer_s = secs
                self._last_infer_ok = time.monotonic()
                self.metrics.triton_latency.observe(secs)
                self._triton_ready = True
                if self.backend is not None and not self.backend.version:
                    self.backend.model_version(max_age_s=0.0)
                if attempt:
                    logger.info("Triton answers again after %d failed attempt(s)", attempt)
                self._resume()
                return out
            except FuturesTimeout:  # stopping, and the drain budget ran out while Triton had not answered
                return None
            except InferenceUnavailable as exc:
                stale = batch.future is not None and batch.submitted_at < self._last_infer_ok
                batch.future = None
                if stale:  # sent during an outage that is over by now: retry at once
                    continue
                attempt += 1
                self._triton_ready = False
                self.metrics.triton_errors.inc()
                self.stats["triton_errors"] += 1
                if not self._consumer.paused:
                    self._consumer.pause()
                    self.metrics.paused.set(1)
                    self._commit_confirmed(force=True)  # the batches before this one are done
                log = logger.warning if attempt == 1 or attempt % 10 == 0 else logger.debug
                log("Triton unavailable (%s); %d frame(s) held, fetching paused, retry %d in %.1fs",
                    exc, len(batch.good), attempt, backoff)
                if self._stop.is_set() and self._draining_too_long():
                    return None
                self._idle_poll(backoff)
                if self._stop.is_set() and self._draining_too_long():
                    return None
                backoff = min(backoff * 2, self.cfg.backoff_max_s)

    def _retry(self, what: str, sink: str, fn: Callable[[], Any]) -> bool:
        """Call ``fn`` until it succeeds (fetching paused meanwhile); False only when draining too long."""
        assert self._consumer is not None
        backoff = self.cfg.backoff_initial_s
        attempt = 0
        while True:
            try:
                fn()
                if attempt:
                    logger.info("%s succeeded after %d failed attempt(s)", what, attempt)
                    self._resume()
                return True
            except Exception as exc:  # noqa: BLE001 - every sink failure is retried
                attempt += 1
                if not self._consumer.paused:
                    self._consumer.pause()
                    self.metrics.paused.set(1)
                self.metrics.write_errors.labels(sink).inc()
                log = logger.warning if attempt == 1 or attempt % 10 == 0 else logger.debug
                log("%s failed (attempt %d): %s; retrying in %.1fs", what, attempt, exc, backoff)
                if self._stop.is_set() and self._draining_too_long():
                    return False
                self._idle_poll(backoff)
                backoff = min(backoff * 2, self.cfg.backoff_max_s)

    def _write(self, batch: _Batch) -> bool:
        """Triton results -> predictions and dead letters produced (not yet confirmed). False: giving up."""
        from tasks.contracts.messages import H_CONTENT_TYPE, H_FRAME_ID, H_REASON, H_TRACEPARENT
        from tasks.adapters.qdrant import PredictionPoint

        assert self._consumer is not None and self._producer is not None
        t0 = time.perf_counter()
        outputs = self._results(batch)
        t1 = time.perf_counter()
        self.stage_s["wait_triton"] += t1 - t0
        if outputs is None:
            logger.warning("giving up on a batch of %d frame(s) at shutdown; it is not committed and will be "
                           "redelivered", len(batch.records))
            return False
        self.metrics.batch_size.observe(len(batch.records))
        processed = _now()
        batch.processed_wall = processed.timestamp()
        processed_iso = _iso(processed)
        version = self.backend.version if self.backend is not None else ""  # refreshed by the health thread
        messages: list[tuple[str, bytes | None, bytes | None, list[tuple[str, bytes]]]] = []
        points: list[PredictionPoint] = []
        captured: list[dt.datetime | None] = []
        batch.messages, batch.points, batch.captured = messages, points, captured
        if batch.good:
            import numpy as np

            n = len(batch.good)
            # convert once per batch (per-element numpy indexing is slow)
            labels = outputs["LABEL"].reshape(n, -1)[:, 0].tolist()
            raw_scores = outputs["SCORE"].reshape(n, -1)[:, 0].astype(np.float64)
            scores = np.round(raw_scores, 6).tolist()
            topl = outputs["TOPK_LABELS"].reshape(n, -1).tolist()
            tops = np.round(outputs["TOPK_SCORES"].reshape(n, -1).astype(np.float64), 6).tolist()
            emb = outputs.get("EMBEDDING")
            emb_rows = emb.reshape(n, -1) if emb is not None else None
            model, topic, policy = self.cfg.model, self.kafka.predictions_topic, self.cfg.qdrant_policy
            infer_ms = round(batch.infer_s * 1000, 3)
            index = self.vectors is not None and emb_rows is not None
            encode = _JSON.encode
            for j, i in enumerate(batch.good):
                rec = batch.records[i]
                fid = batch.frame_ids[j]
                cap_text = rec.header("captured_at")
                cap = _parse_time(cap_text)
                captured.append(cap)
                ts = cap or (dt.datetime.fromtimestamp(rec.timestamp_ms / 1000, dt.timezone.utc)
                             if rec.timestamp_ms else None)
                device = rec.key.decode("utf-8", "replace") if rec.key else (rec.header("device_id") or "")
                trace = rec.headers.get(H_TRACEPARENT)
                pred = {
                    "frame_id": fid,
                    "device_id": device,
                    "label": labels[j],
                    "score": scores[j],
                    "topk": [{"label": lab, "score": sc} for lab, sc in zip(topl[j], tops[j])],
                    "model_name": model,
                    "model_version": version,
                    "latency_ms": round((processed - ts).total_seconds() * 1000, 3) if ts else None,
                    "inference_ms": infer_ms,
                    "processed_at": processed_iso,
                    "captured_at": _iso(cap) if cap else cap_text,
                    "traceparent": trace.decode("latin-1") if trace else None,
                }
                fid_b = fid.encode()
                headers = [(H_FRAME_ID, fid_b), (H_CONTENT_TYPE, b"application/json")]
                if trace:
                    headers.append((H_TRACEPARENT, trace))
                messages.append((topic, encode(pred).encode(), fid_b, headers))
                if index:
                    why = policy.reason(fid, scores[j])
                    if why is not None:
                        payload = {k: v for k, v in pred.items() if k != "traceparent"}
                        payload["indexed_because"] = why
                        points.append(PredictionPoint(fid, emb_rows[j], payload))
        for i, rej in batch.rejected:
            rec = batch.records[i]
            headers = list(rec.raw_headers) + [
                (H_REASON, rej.reason.encode()), ("reason_detail", rej.detail[:500].encode()),
                ("source_topic", rec.topic.encode()), ("source_partition", str(rec.partition).encode()),
                ("source_offset", str(rec.offset).encode()), ("dead_lettered_at", processed_iso.encode())]
            messages.append((self.kafka.dlq_topic, rec.value or b"", rec.key, headers))
            logger.info("dead letter %s[%d]@%d: %s", rec.topic, rec.partition, rec.offset, rej)

        if messages:
            batch.ticket = self._producer.produce_batch(messages)
        self.stage_s["build_produce"] += time.perf_counter() - t1
        return True

    def _confirm(self, batch: _Batch) -> bool:
        """Wait for the batch's Kafka acks (re-sending failures), upsert to Qdrant, commit. False: not committed."""
        assert self._consumer is not None and self._producer is not None
        producer = self._producer
        points = batch.points

        def confirm_kafka() -> None:
            from tasks.adapters.kafka import DeliveryError

            assert batch.ticket is not None
            try:  # a stop request during a broker outage must not wait out the 10 s
                producer.wait(batch.ticket, timeout=10.0,
                              give_up=lambda: self._stop.is_set() and self._draining_too_long())
            except DeliveryError:
                if batch.ticket.pending == 0 and batch.ticket.failed:
                    batch.ticket = producer.produce_batch(batch.ticket.failed)  # re-send just the failures
                raise

        t0 = time.perf_counter()
        if batch.ticket is not None and not self._retry(
                f"writing {len(batch.messages)} message(s) to Kafka", "kafka", confirm_kafka):
            return False
        t1 = time.perf_counter()
        self.stage_s["wait_kafka_acks"] += t1 - t0
        if points:
            vectors = self.vectors
            assert vectors is not None
            if not self._retry(f"upserting {len(points)} point(s) to Qdrant", "qdrant",
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

        self._to_commit.update(batch.offsets())
        if not self._commit_confirmed():
            return False
        self.stage_s["commit"] += time.perf_counter() - t2
        now = time.monotonic()
        if self._first_batch_at is None:
            self._first_batch_at = batch.polled_at
        self.stats["busy_s"] = round(now - self._first_batch_at, 3)
        self.stats["batches"] += 1
        if batch.good:
            self.metrics.frames.labels("predicted").inc(len(batch.good))
            self.stats["predicted"] += len(batch.good)
        if batch.rejected:
            self.metrics.frames.labels("dead_letter").inc(len(batch.rejected))
            self.stats["dead_letter"] += len(batch.rejected)
            for _, rej in batch.rejected:
                self.metrics.dead_letters.labels(rej.reason).inc()
        return True

    def _commit_confirmed(self, force: bool = False) -> bool:
        """Commit the offsets of confirmed batches: at most every ``commit_interval_ms``, or now (``force``:
        the loop has nothing else in hand, Triton is down, partitions are revoked). False: giving up at stop.

        Asynchronous: the loop does not wait for the coordinator; a lost commit only means redelivery
        (idempotent sinks). The last offsets are committed synchronously at shutdown. Fewer commits
        spare the broker: on the local Tansu broker one per batch cost ~0.05 cores at 3.8k frames/s.
        """
        if not self._to_commit:
            return True
        now = time.monotonic()
        if not force and (now - self._last_commit) * 1000.0 < self.cfg.commit_interval_ms:
            return True
        assert self._consumer is not None
        consumer, offsets = self._consumer, dict(self._to_commit)

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
        self._last_commit = now
        self._committed.update(offsets)
        self._to_commit.clear()
        self.metrics.commits.inc()
        self.stats["commits"] += 1
        return True

    def _revoked(self, partitions: list[tuple[str, int]]) -> None:
        """Before partitions move to another member: commit what was confirmed for them (synchronously)."""
        assert self._consumer is not None
        revoked = set(partitions)
        offsets = {tp: o for tp, o in self._to_commit.items() if tp in revoked}
        if offsets:
            res = self._consumer.commit(offsets)
            if res.ok:
                self._committed.update(offsets)
                for tp in offsets:
                    self._to_commit.pop(tp, None)
            else:
                logger.warning("commit on revoke failed (%s): the new owner re-reads those frames", res.error)

    def _update_lag(self, every_s: float = 1.0) -> None:
        """Copy the consumer's lag (librdkafka statistics) into the gauges, at most every ``every_s``.

        Called from the loop and while it waits (a Triton outage, a sink retry): the held frames are
        exactly the lag an operator looks for then."""
        assert self._consumer is not None
        now = time.monotonic()
        if now - self._last_lag < every_s:
            return
        self._last_lag = now
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
            assert self._consumer is not None
            self._infer_pool = ThreadPoolExecutor(max_workers=max(1, self.cfg.inflight), thread_name_prefix="infer")
            # Everything allocated so far (libraries, clients, Qdrant's collection) lives as long as the
            # process: move it out of the collector's reach, and collect the young generation less often.
            # Full collections otherwise walked ~1M long-lived objects and stalled the loop 80-110 ms.
            gc.collect()
            gc.freeze()
            gc.set_threshold(50_000, 20, 100)
            logger.info("consuming %s as group %s (batch <= %d, wait <= %d ms), Triton %s model %s, Qdrant %s",
                        self.kafka.frames_topic, self.cfg.group_id, self.cfg.max_batch, self.cfg.max_wait_ms,
                        self.cfg.triton_url, self.cfg.model,
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
        consumer = self._consumer
        assert consumer is not None
        to_confirm: _Batch | None = None  # produced, waiting for acks / Qdrant / commit
        pending: _Batch | None = None  # sent to Triton
        wait_s = self.cfg.max_wait_ms / 1000.0
        while not self._stop.is_set():
            self._heartbeat = time.monotonic()
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
                self._last_message = time.monotonic()
                batch = self._prepare(records)
                self._submit(batch)
                self.stage_s["decode"] += time.perf_counter() - t1
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
        self._committed.update(self._to_commit)
        consumer, committed = self._consumer, dict(self._committed)

        def leave() -> None:
            if consumer is None:
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
            logger.warning("the broker did not answer the final commit / leaving the group in time: exiting "
                           "without them; frames after the last acknowledged commit will be redelivered")
        if self._producer is not None:
            self._producer.close(timeout=max(0.1, min(2.0, exit_by - time.monotonic())))
        if self._infer_pool is not None:
            self._infer_pool.shutdown(wait=False, cancel_futures=True)
        self._stop.set()
        if self.http is not None:
            self.http.stop()
        logger.info("consumer stopped: %s", json.dumps(self.stats))


# --------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    env = os.environ.get
    p = argparse.ArgumentParser(
        prog="mlpipe stream",
        description="Streaming inference consumer: frames (Kafka) -> Triton -> predictions (Kafka) + Qdrant. "
                    "Kafka settings come from MLPIPE_KAFKA_* (see tasks.adapters.kafka.KafkaConfig), Qdrant from "
                    "MLPIPE_QDRANT_URL / MLPIPE_QDRANT_PATH.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--bootstrap", default=None, help="Kafka bootstrap servers (overrides MLPIPE_KAFKA_BOOTSTRAP)")
    p.add_argument("--topic-prefix", default=None, help="topic name prefix (overrides MLPIPE_KAFKA_TOPIC_PREFIX)")
    p.add_argument("--group", default=env("MLPIPE_CONSUMER_GROUP") or DEFAULT_GROUP, help="consumer group id")
    p.add_argument("--triton-url", default=env("MLPIPE_TRITON_GRPC_URL") or "127.0.0.1:8001",
                   help="Triton gRPC host:port (the sidecar uses localhost:8001)")
    p.add_argument("--model", default=None, help="Triton ensemble name (default MLPIPE_MODEL_NAME or digits)")
    p.add_argument("--max-batch", type=int, default=int(env("MLPIPE_CONSUMER_MAX_BATCH") or 256),
                   help="most frames per micro-batch")
    p.add_argument("--max-wait-ms", type=int, default=int(env("MLPIPE_CONSUMER_MAX_WAIT_MS") or 5),
                   help="longest wait to fill a micro-batch")
    p.add_argument("--model-max-batch", type=int, default=MAX_BATCH,
                   help="the model's max_batch_size: larger micro-batches are split into concurrent calls")
    p.add_argument("--inflight", type=int, default=int(env("MLPIPE_CONSUMER_INFLIGHT") or 2),
                   help="micro-batches sent to Triton at once (2: the next one waits in Triton's queue while "
                        "one is answered, so the model does not idle between batches)")
    p.add_argument("--commit-interval-ms", type=int, default=int(env("MLPIPE_CONSUMER_COMMIT_INTERVAL_MS") or 100),
                   help="commit the offsets of finished batches at most this often (and whenever idle); a crash "
                        "redelivers at most this much, which the idempotent sinks absorb")
    p.add_argument("--max-frame-bytes", type=int, default=int(env("MLPIPE_MAX_FRAME_BYTES") or DEFAULT_MAX_FRAME_BYTES),
                   help="larger frames are dead-lettered as oversize")
    p.add_argument("--qdrant-policy", default=env("MLPIPE_QDRANT_POLICY") or DEFAULT_QDRANT_POLICY,
                   help="which predictions go to Qdrant: all | none | sample:F | low_confidence:T (comma = union)")
    p.add_argument("--qdrant-url", default=None, help="Qdrant server URL (overrides MLPIPE_QDRANT_URL)")
    p.add_argument("--qdrant-path", default=None, help="Qdrant local-mode folder or :memory: "
                   "(overrides MLPIPE_QDRANT_PATH; default $MLPIPE_HOME/qdrant)")
    p.add_argument("--http-host", default=env("MLPIPE_CONSUMER_HTTP_HOST") or "127.0.0.1",
                   help="address of /metrics /healthz /readyz (0.0.0.0 in a pod, for the kubelet probes)")
    p.add_argument("--http-port", type=int, default=int(env("MLPIPE_CONSUMER_HTTP_PORT") or 9108),
                   help="port of /metrics /healthz /readyz (0: a free one, -1: no HTTP server)")
    p.add_argument("--session-timeout-ms", type=int, default=int(env("MLPIPE_KAFKA_SESSION_TIMEOUT_MS") or 10000))
    p.add_argument("--triton-timeout", type=float, default=10.0, help="seconds before a Triton call counts as failed")
    p.add_argument("--backoff-max", type=float, default=5.0,
                   help="longest wait between retries while Triton, Kafka or Qdrant is unavailable")
    p.add_argument("--drain-timeout", type=float, default=7.0,
                   help="on SIGTERM, seconds allowed to finish the batches in hand (even while Triton or the "
                        "broker hangs); leaving the group and closing get up to ~1.5 s more, so the default exits "
                        "within 10 s")
    p.add_argument("--exit-when-idle", type=float, default=None, metavar="SECONDS",
                   help="exit after this long without frames (benchmarks, batch back-fills)")
    p.add_argument("--no-create-topics", action="store_true", help="do not create missing topics at start")
    p.add_argument("--kafka-config", action="append", default=[], metavar="KEY=VALUE",
                   help="extra librdkafka setting for the frames consumer (repeatable), e.g. fetch.min.bytes=16384")
    p.add_argument("--stats-json", default=None, help="write the final counters to this file on exit")
    p.add_argument("--latency-log", default=None, metavar="PATH",
                   help="on exit, write one entry per predicted frame to this JSON file (benchmarks): "
                        "[captured_at epoch, then seconds from it until both sinks were written, the loop "
                        "polled the frame, Triton answered, the loop took the answer]")
    p.add_argument("--log-level", default=env("MLPIPE_LOG_LEVEL") or "INFO")
    return p


def _check_kafka_overrides(overrides: dict[str, Any]) -> None:
    """ValueError naming the setting when librdkafka does not accept one (no connection is made)."""
    from confluent_kafka import Consumer, KafkaException

    try:
        # no bootstrap servers: librdkafka parses the settings and never connects; log_level 0: silent
        Consumer({"group.id": "mlpipe-config-check", "log_level": 0, **overrides}).close()
    except (KafkaException, ValueError, TypeError) as exc:
        raise ValueError(f"--kafka-config: {exc}") from None


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("tasks.adapters.kafka.librdkafka").setLevel(logging.WARNING)
    from tasks.adapters.kafka import KafkaConfig
    from tasks.config import load_settings

    try:
        kafka = KafkaConfig.from_env(bootstrap=args.bootstrap, topic_prefix=args.topic_prefix)
        policy = QdrantPolicy.parse(args.qdrant_policy)
        for name in ("max_batch", "max_wait_ms", "model_max_batch", "inflight", "max_frame_bytes"):
            if getattr(args, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive")
        model = args.model or load_settings().model_name
        kafka_overrides: dict[str, Any] = {}
        for item in args.kafka_config:
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise ValueError(f"--kafka-config {item!r}: expected KEY=VALUE")
            kafka_overrides[key.strip()] = value.strip()
        if kafka_overrides:
            _check_kafka_overrides(kafka_overrides)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logger.info("kafka: %s", kafka)  # dataclass repr hides the password and key
    cfg = StreamConfig(
        group_id=args.group, model=model, triton_url=args.triton_url, max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms, max_model_batch=args.model_max_batch, inflight=args.inflight,
        commit_interval_ms=max(0, args.commit_interval_ms), max_frame_bytes=args.max_frame_bytes,
        qdrant_policy=policy, http_host=args.http_host, http_port=None if args.http_port < 0 else args.http_port,
        session_timeout_ms=args.session_timeout_ms, triton_timeout_s=args.triton_timeout,
        drain_timeout_s=args.drain_timeout, exit_when_idle_s=args.exit_when_idle, backoff_max_s=args.backoff_max,
        create_topics=not args.no_create_topics, kafka_overrides=kafka_overrides,
        record_latency=bool(args.latency_log))
    vectors = None
    if policy.enabled:
        from tasks.adapters.qdrant import VectorStoreError, open_vectors

        try:
            vectors = open_vectors(url=args.qdrant_url, path=args.qdrant_path)
        except VectorStoreError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    try:
        chunks = -(-cfg.max_batch // cfg.max_model_batch)  # Triton calls per micro-batch
        backend = TritonBackend(cfg.triton_url, cfg.model, timeout_s=cfg.triton_timeout_s,
                                max_model_batch=cfg.max_model_batch, concurrency=chunks * cfg.inflight)
    except Exception as exc:  # noqa: BLE001 - a bad URL is a usage error
        print(f"error: cannot create a Triton client for {cfg.triton_url}: {exc}", file=sys.stderr)
        return 2
    consumer = StreamConsumer(kafka, cfg, backend=backend, vectors=vectors)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: consumer.stop())
    try:
        stats = consumer.run()
    finally:
        backend.close()
        if vectors is not None:
            vectors.close()
    if args.stats_json:
        with open(args.stats_json + ".tmp", "w") as fh:
            json.dump(stats, fh)
        os.replace(args.stats_json + ".tmp", args.stats_json)
    if args.latency_log:
        with open(args.latency_log + ".tmp", "w") as fh:
            json.dump(consumer.latencies, fh)
        os.replace(args.latency_log + ".tmp", args.latency_log)
    if consumer.abandoned:  # librdkafka's handles would block the interpreter's exit on the unreachable broker
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
