"""The consumer's settings (``StreamConfig``); the CLI (``cli.py``) fills them from flags and MLPIPE_* variables."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tasks.contracts.serving import MAX_BATCH
from tasks.serving.consumer.policy import DEFAULT_QDRANT_POLICY, QdrantPolicy

DEFAULT_GROUP = "mlpipe-consumer"


@dataclass
class StreamConfig:
    group_id: str = DEFAULT_GROUP
    model: str = "digits"  # the model project (its spec: frames, classes) and the Triton ensemble of that name
    triton_url: str = "127.0.0.1:8001"
    max_batch: int = MAX_BATCH  # one default with the model repository (tasks.contracts.serving)
    max_wait_ms: int = 5
    max_model_batch: int = MAX_BATCH
    inflight: int = 2  # micro-batches at Triton at once: the next one is queued there while one is answered
    max_frame_bytes: int | None = None  # larger frames are dead letters (oversize); None: the spec's limit
    qdrant_policy: QdrantPolicy = field(default_factory=lambda: QdrantPolicy.parse(DEFAULT_QDRANT_POLICY))
    http_host: str = "127.0.0.1"
    http_port: int | None = 9108  # None: no HTTP server
    session_timeout_ms: int = 10000
    triton_timeout_s: float = 10.0
    backoff_initial_s: float = 0.2
    backoff_max_s: float = 5.0
    backoff_jitter: float = 0.5  # each wait is drawn from [(1 - jitter) x, x] of the exponential step x
    drain_timeout_s: float = 7.0
    exit_when_idle_s: float | None = None
    create_topics: bool = True
    kafka_overrides: dict[str, Any] = field(default_factory=dict)
    commit_interval_ms: int = 100  # confirmed offsets are committed at most this often (and when idle)
    record_latency: bool = False  # keep per frame captured_at and the seconds to each step (--latency-log)
    max_message_bytes: int | None = None  # largest message produced; None: KafkaConfig.max_message_bytes
    broker_check_s: float = 1.0  # how often the broker's incarnation is read (0: never; fakes)
    reject_hold_s: float = 10.0  # a batch Triton rejects frame by frame is held at most this long
    max_hold_s: float = 600.0  # a batch held by a Triton outage (or a Qdrant upsert) at most this long; 0: no bound
    store_attempts: int = 3  # tries to store an oversize original before dead-lettering without it
    # the served version is read after an answer, cached at most this long: a prediction's label follows a
    # deploy within 0.25 s; 0 reads it after every answer (one more gRPC call per micro-batch: a measurable
    # share of the loop at small batches, docs/BENCH.md)
    version_max_age_s: float = 0.25
